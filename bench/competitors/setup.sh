#!/usr/bin/env bash
# Creates (or reuses) the virtualenv with the pinned competitor engines: Dask distributed,
# Parsl (HighThroughputExecutor, the engine inside Globus Compute endpoints) and Ray.
#
#   bench/competitors/setup.sh          # idempotent: no-op when the venv already has the pins
#   bench/competitors/setup.sh --lock   # after an install: rewrite requirements.lock from the venv
#
# Environment:
#   FUNCMESH_BENCH_VENV    venv location (default /var/cache/funcmesh/bench-venv)
#   FUNCMESH_BENCH_PYTHON  interpreter the venv is made from (default: python3 on PATH, 3.11 here)
#
# Progress goes to stderr; stdout stays empty so run.sh can print JSON lines only.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${FUNCMESH_BENCH_VENV:-/var/cache/funcmesh/bench-venv}"
python="${FUNCMESH_BENCH_PYTHON:-python3}"
req="$here/requirements.txt"
lock="$here/requirements.lock"

log() { echo "setup.sh: $*" >&2; }

if ! command -v "$python" >/dev/null 2>&1; then
  log "no '$python' on PATH"
  exit 1
fi
pyver="$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
case "$pyver" in
  3.1[0-9].*) ;;
  *) log "warning: $python is Python $pyver; the pins were chosen for 3.11" ;;
esac

if [ "${1:-}" = "--lock" ]; then
  [ -x "$venv/bin/python" ] || { log "no venv at $venv: run setup.sh first"; exit 1; }
  {
    echo "# Every package in the measured venv (pip freeze), Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), x86_64 Linux."
    echo "# Used by setup.sh as a constraints file. Regenerate: bench/competitors/setup.sh --lock"
    "$venv/bin/python" -m pip freeze --all --exclude-editable | grep -vE '^(pip|setuptools|wheel)=='
  } >"$lock"
  log "wrote $lock ($(grep -vc '^#' "$lock") packages)"
  exit 0
fi

# The stamp: what was asked for (pins + lock) and which interpreter it was installed for.
want="$({ cat "$req"; [ -f "$lock" ] && cat "$lock"; echo "python $pyver"; } | sha256sum | cut -d' ' -f1)"
stamp="$venv/.funcmesh-bench-stamp"

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  log "venv $venv is up to date (stamp ${want:0:12})"
  exit 0
fi

mkdir -p "$(dirname "$venv")"
if [ -x "$venv/bin/python" ] && [ "$("$venv/bin/python" -c 'import platform; print(platform.python_version())' 2>/dev/null)" != "$pyver" ]; then
  log "venv $venv was made with another Python: recreating it"
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  log "creating venv $venv with $python ($pyver)"
  "$python" -m venv "$venv" || {
    log "'$python -m venv' failed (on Debian's own python3: apt-get install python3-venv)"
    exit 1
  }
fi
rm -f "$stamp"

constraints=()
[ -f "$lock" ] && constraints=(-c "$lock")
log "installing $(grep -vE '^\s*(#|$)' "$req" | tr '\n' ' ')"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
  -r "$req" "${constraints[@]}" >&2
"$venv/bin/python" -m pip check >&2 || log "warning: pip check reports conflicts (see above)"
echo "$want" >"$stamp"
log "done: $("$venv/bin/python" -c 'import dask, distributed, parsl, ray; print("dask", dask.__version__, "distributed", distributed.__version__, "parsl", parsl.__version__, "ray", ray.__version__)')"
