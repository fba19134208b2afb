#!/usr/bin/env bash
# No-op task benchmark of the incumbent Python task engines on this machine: one JSON line per
# engine on stdout (see README.md for the fields). One engine failing, hanging or crashing gives
# an error line for it and the run goes on.
#
#   bench/competitors/run.sh
#   N=1000 M=100 ENGINES="dask ray" bench/competitors/run.sh
#
# Environment:
#   N               throughput batch size (default 5000)
#   M               latency round trips (default 500)
#   ENGINES         engines in order (default "dask parsl parsl-htex ray")
#   ENGINE_TIMEOUT  seconds before one engine's run is stopped (default 900)
#   SETTLE_S        pause between engines, seconds (default 3)
#   FUNCMESH_BENCH_VENV, FUNCMESH_BENCH_PYTHON   see setup.sh
# Engine logs (stderr) go to a run directory named on stderr at the start.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${FUNCMESH_BENCH_VENV:-/var/cache/funcmesh/bench-venv}"
N="${N:-5000}"
M="${M:-500}"
ENGINES="${ENGINES:-dask parsl parsl-htex ray}"
ENGINE_TIMEOUT="${ENGINE_TIMEOUT:-900}"
SETTLE_S="${SETTLE_S:-3}"

json_error() { # engine message [log]
  python3 -c 'import json,sys; d={"engine":sys.argv[1],"error":sys.argv[2]}
if len(sys.argv)>3: d["log"]=sys.argv[3]
print(json.dumps(d))' "$@"
}

if ! "$here/setup.sh"; then
  for e in $ENGINES; do json_error "$e" "setup.sh failed: no venv with the pinned engines"; done
  exit 1
fi

logdir="$(mktemp -d "${TMPDIR:-/tmp}/funcmesh-bench-competitors.XXXXXX")"
echo "run.sh: N=$N M=$M engines: $ENGINES; logs in $logdir" >&2

failed=0
first=1
for e in $ENGINES; do
  [ $first -eq 1 ] || sleep "$SETTLE_S"
  first=0
  log="$logdir/$e.log"
  out="$logdir/$e.json"
  # Each engine runs in a session of its own (setsid; none of the engines starts a new
  # session), so whatever is left of it afterwards can be found by session id and ended.
  # --foreground: the timeout's SIGTERM goes to noop.py alone, which then shuts its engine down
  # (signalling the whole group instead makes Parsl's cleanup hang on a dead interchange);
  # SIGKILL 90 s later if that shutdown hangs.
  setsid -w timeout --foreground --kill-after=90 "$ENGINE_TIMEOUT" "$venv/bin/python" "$here/noop.py" \
    --engine "$e" --tasks "$N" --latency-samples "$M" --json >"$out" 2>"$log" &
  sid=$!  # setsid, not a group leader in a script without job control, execs in place: its pid is the session id
  wait "$sid"
  rc=$?
  line="$(tail -n 1 "$out")"

  # noop.py ends what its engine leaves behind, but a killed noop.py cannot.
  sleep 1
  strays="$(ps -eo pid=,sid=,stat= | awk -v s="$sid" '$2 == s && $3 !~ /^Z/ {print $1}' | tr '\n' ' ' | sed 's/ *$//')"
  if [ -n "$strays" ]; then
    echo "run.sh: $e left processes behind, ending them: $(ps -o pid=,args= -p "${strays// /,}" | cut -c1-150 | tr '\n' ';')" >&2
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
      *) msg="noop.py exited with code $rc and printed no result" ;;
    esac
    json_error "$e" "$msg" "$log"
    failed=1
  fi
done
exit $failed
