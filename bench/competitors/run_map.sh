#!/usr/bin/env bash
# `Executor.map` over no-op calls, and single submit().result() round trips, through the Python
# executors of funcmesh, Dask distributed, Parsl, Ray and the Globus Compute SDK (against
# funcmesh), each with 2 worker processes, one after another in one run: one JSON line per
# engine on stdout (see README.md). One engine failing, hanging or crashing gives an error line
# for it and the run goes on.
#
#   bench/competitors/run_map.sh
#   N=300 M=20 ENGINES="funcmesh dask" bench/competitors/run_map.sh
#
# Environment:
#   N               calls in the map (default 10000)
#   M               latency round trips (default 200)
#   ENGINES         engines in order (default "funcmesh dask parsl ray globus-compute")
#   FUNCMESH_BIN    the funcmesh binary (default: $CARGO_TARGET_DIR/release/funcmesh, with
#                   CARGO_TARGET_DIR defaulting to /var/cache/funcmesh/target)
#   ENGINE_TIMEOUT  seconds before one engine's run is stopped (default 1200)
#   SETTLE_S        pause between engines, seconds (default 3)
#   FUNCMESH_BENCH_VENV, FUNCMESH_BENCH_PYTHON   see setup.sh (funcmesh, dask, parsl, ray)
#   FUNCMESH_GC_VENV_DIR, FUNCMESH_GC_SDK_VERSION  see sdk/python/tests/globus_compute_env.py
#                   (the globus-compute engine runs in that virtualenv's python)
# Engine logs (stderr) go to a run directory named on stderr at the start.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${FUNCMESH_BENCH_VENV:-/var/cache/funcmesh/bench-venv}"
N="${N:-10000}"
M="${M:-200}"
ENGINES="${ENGINES:-funcmesh dask parsl ray globus-compute}"
ENGINE_TIMEOUT="${ENGINE_TIMEOUT:-1200}"
SETTLE_S="${SETTLE_S:-3}"
FUNCMESH_BIN="${FUNCMESH_BIN:-${CARGO_TARGET_DIR:-/var/cache/funcmesh/target}/release/funcmesh}"

json_error() { # engine message [log]
  python3 -c 'import json,sys; d={"engine":sys.argv[1],"error":sys.argv[2]}
if len(sys.argv)>3: d["log"]=sys.argv[3]
print(json.dumps(d))' "$@"
}

if ! "$here/setup.sh"; then
  for e in $ENGINES; do json_error "$e" "setup.sh failed: no venv with the pinned engines"; done
  exit 1
fi

gc_python=""
case " $ENGINES " in
  *" globus-compute "*)
    # The SDK's own virtualenv, made (once) as the Globus Compute tests make it.
    # (Whatever pip prints goes to stderr; the interpreter's path comes back on fd 3.)
    gc_python="$( (cd "$repo/sdk/python/tests" && python3 -c 'import os; from globus_compute_env import sdk_venv; os.write(3, sdk_venv().encode())') 3>&1 1>&2)" \
      || gc_python=""
    ;;
esac

logdir="$(mktemp -d "${TMPDIR:-/tmp}/funcmesh-bench-map.XXXXXX")"
echo "run_map.sh: N=$N M=$M engines: $ENGINES; funcmesh: $FUNCMESH_BIN; logs in $logdir" >&2

failed=0
first=1
for e in $ENGINES; do
  [ $first -eq 1 ] || sleep "$SETTLE_S"
  first=0
  log="$logdir/$e.log"
  out="$logdir/$e.json"
  python="$venv/bin/python"
  if [ "$e" = globus-compute ]; then
    if [ -z "$gc_python" ]; then
      json_error "$e" "no Globus Compute SDK virtualenv (sdk/python/tests/globus_compute_env.py sdk_venv() failed)"
      failed=1
      continue
    fi
    python="$gc_python"
  fi
  # Each engine runs in a session of its own (setsid), so whatever is left of it afterwards can
  # be found by session id and ended (funcmesh's workers and RabbitMQ start sessions of their
  # own: executor_map.py finds those by their temp dirs and ancestry, and ends them itself).
  # --foreground: the timeout's SIGTERM goes to executor_map.py alone, which then shuts its
  # engine down; SIGKILL 120 s later if that shutdown hangs.
  setsid -w timeout --foreground --kill-after=120 "$ENGINE_TIMEOUT" "$python" "$here/executor_map.py" \
    --engine "$e" --tasks "$N" --latency-samples "$M" --funcmesh-bin "$FUNCMESH_BIN" --json \
    >"$out" 2>"$log" &
  sid=$!  # setsid, not a group leader in a script without job control, execs in place: its pid is the session id
  wait "$sid"
  rc=$?
  line="$(tail -n 1 "$out")"

  # executor_map.py ends what its engine leaves behind, but a killed executor_map.py cannot.
  sleep 1
  strays="$(ps -eo pid=,sid=,stat= | awk -v s="$sid" '$2 == s && $3 !~ /^Z/ {print $1}' | tr '\n' ' ' | sed 's/ *$//')"
  if [ -n "$strays" ]; then
    echo "run_map.sh: $e left processes behind, ending them: $(ps -o pid=,args= -p "${strays// /,}" | cut -c1-150 | tr '\n' ';')" >&2
    # shellcheck disable=SC2086 # one argument per pid
    kill -9 $strays 2>/dev/null || true
  fi

  if printf '%s' "$line" | python3 -c 'import json,sys; json.loads(sys.stdin.read())' 2>/dev/null; then
    if [ -n "$strays" ]; then
      line="$(printf '%s' "$line" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); d["strays_killed_by_run_sh"]=sys.argv[1].split(); print(json.dumps(d))' "$strays")"
    fi
    printf '%s\n' "$line"
    printf '%s' "$line" | grep -q '"error"' && failed=1
  else
    case $rc in
      124|137) msg="timed out after ${ENGINE_TIMEOUT}s" ;;
      *) msg="executor_map.py exited with code $rc and printed no result" ;;
    esac
    json_error "$e" "$msg" "$log"
    failed=1
  fi
done
exit $failed
