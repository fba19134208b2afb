#!/usr/bin/env python3
"""`Executor.map` over no-op calls, one Python executor on a local 2-worker cluster.

    python executor_map.py --engine funcmesh|dask|parsl|ray|globus-compute \\
        --tasks N --latency-samples M --json [--funcmesh-bin PATH]

For the chosen engine: start it with exactly 2 worker processes, wait for its own "ready"
signal, warm up (50 round trips and a map of min(N, 1000) calls), then
  1. latency: M sequential `ex.submit(noop, i).result()` round trips (p50/p99/mean ms);
  2. map: consume `ex.map(noop, range(N))`: the time for `map` to return, to its first
     result, and to its last (tasks/s = N / that wall time);
then shut everything down and end whatever the engine left behind.

Engines (what "ex", "submit" and "map" are for each: README.md has the table):
  funcmesh        funcmesh.Executor (sdk/python) on a one-node testnet (`funcmesh testnet up`),
                  the endpoint's 2 workers in this interpreter, running as the node's user
  dask            distributed.Client(LocalCluster(2 workers, 1 thread each, processes))
                  .get_executor(pure=False)
  parsl           parsl.concurrent.ParslPoolExecutor, HighThroughputExecutor(2 workers),
                  LocalProvider
  ray             ray.util.multiprocessing.Pool(processes=2) on ray.init(num_cpus=2): Ray 2.60
                  has no concurrent.futures Executor; apply_async(...).get() and
                  map(..., chunksize=1) (and, reported apart, imap and map's default chunks)
  globus-compute  globus_compute_sdk.Executor 4.19.0 against a funcmesh node serving the Globus
                  Compute API (results over a private RabbitMQ), as sdk/python/tests/
                  globus_compute_env.py sets it up; its map raises NotImplementedError, so
                  "map" is concurrent.futures.Executor.map(gce, ...) (the base class's, over its
                  submit). Must run in the SDK's virtualenv's python (run_map.sh does that).

The engine's modules are imported only for that engine, and nothing here needs psutil (the
Globus Compute virtualenv has only the SDK): processes and CPU times are read from /proc.

With --json the only thing on stdout is one JSON object (one line); everything the engines
print goes to stderr. On failure the object has an "error" field and the exit code is 1.
"""

import argparse
import concurrent.futures
import faulthandler
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SHUTDOWN_TIMEOUT_S = 90


def noop(x):
    return None


# --------------------------------------------------------------------------- helpers


def percentile(sorted_xs, p):
    """Linear-interpolated percentile (like numpy's default) of an already sorted list."""
    if not sorted_xs:
        return None
    k = (len(sorted_xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (k - lo)


def latency_stats(samples_s):
    ms = sorted(s * 1000.0 for s in samples_s)
    r = lambda v: round(v, 3)  # noqa: E731
    return {
        "p50": r(percentile(ms, 50)),
        "p99": r(percentile(ms, 99)),
        "mean": r(statistics.fmean(ms)),
        "min": r(ms[0]),
        "max": r(ms[-1]),
    }


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def wait_for(what, check, timeout, interval=0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as e:  # noqa: BLE001 - reported if it never comes
            last = e
        time.sleep(interval)
    raise TimeoutError("%s did not happen within %ds (last error: %r)" % (what, timeout, last))


# --- processes, from /proc -------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_table():
    """{pid: {ppid, state, cpu_ticks, cmd}} of every process now."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            with open("/proc/%d/stat" % pid) as f:
                stat = f.read()
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        rest = stat[stat.rindex(")") + 2:].split()
        table[pid] = {
            "ppid": int(rest[1]),
            "state": rest[0],
            "cpu_ticks": int(rest[11]) + int(rest[12]),
            "cmd": cmd,
            "comm": stat[stat.index("(") + 1:stat.rindex(")")],
        }
    return table


def rss_bytes(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def our_new_processes(before_pids, markers):
    """Processes that did not exist before the engine started and that belong to it: their
    command line names one of the engine's own temp dirs (the testnet's nodes, RabbitMQ), or
    they descend from us or from such a process (workers of a node, Ray's and Parsl's
    helpers). A process whose parent died is found by its marker or not at all."""
    me = os.getpid()
    table = proc_table()
    marked = set()
    for pid, p in table.items():
        if pid in before_pids or pid == me:
            continue
        if any(m and m in p["cmd"] for m in markers):
            marked.add(pid)

    def belongs(pid):
        seen = 0
        while pid > 1 and seen < 64:
            if pid == me or pid in marked:
                return True
            p = table.get(pid)
            if p is None:
                return False
            pid = p["ppid"]
            seen += 1
        return False

    found = []
    for pid, p in table.items():
        if pid in before_pids or pid == me or p["state"] == "Z":
            continue
        if "multiprocessing.resource_tracker" in p["cmd"] and p["ppid"] == me:
            continue  # this interpreter's own stdlib helper; exits with us
        if pid in marked or belongs(p["ppid"]):
            found.append({"pid": pid, "cmd": (p["cmd"] or "[%s]" % p["comm"])[:160]})
    return found


def proc_name(cmd):
    """A short name for a cluster process, from its command line."""
    words = cmd.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0]
    prog = os.path.basename(words[0])
    if "-c" in words[1:3]:  # python -c ..., python -B -c ..., bash -c ...
        code = " ".join(words[words.index("-c") + 1:])
        if "spawn_main" in code:
            return "multiprocessing worker"
        return prog + " -c " + code[:24]
    if prog == "funcmesh" and len(words) > 1:
        return "funcmesh " + words[1]
    if prog in ("beam.smp", "erl_child_setup", "epmd", "inet_gethost"):
        return "rabbitmq: " + prog
    for w in words:
        base = os.path.basename(w)
        if base.endswith((".py", ".sh")) or base in ("raylet", "gcs_server", "plasma_store"):
            return (prog + " " + base if base.endswith(".sh") else base)[:40]
    return " ".join(os.path.basename(w) for w in words[:2])[:40]


class CpuMeter:
    """How busy the machine was during a phase, and how much of that was not us: system-wide
    busy time from /proc/stat minus the CPU time of this process and the engine's processes
    (those that exist when the meter starts)."""

    def __init__(self, procs):
        self.pids = [os.getpid()] + [p["pid"] for p in procs]
        self.ncpu = os.cpu_count() or 1

    def _ours(self):
        total = 0
        for pid in self.pids:
            try:
                with open("/proc/%d/stat" % pid) as f:
                    rest = f.read().rsplit(")", 1)[1].split()
                total += int(rest[11]) + int(rest[12])
            except (OSError, IndexError, ValueError):
                pass
        return total / CLK_TCK

    @staticmethod
    def _stat():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal (guest is counted in user)
        busy = v[0] + v[1] + v[2] + v[5] + v[6]
        return busy, v[7] if len(v) > 7 else 0

    def start(self):
        self.t0 = time.perf_counter()
        self.busy0, self.steal0 = self._stat()
        self.ours0 = self._ours()

    def stop(self):
        wall = time.perf_counter() - self.t0
        busy, steal = self._stat()
        ours = self._ours() - self.ours0
        cap = wall * self.ncpu
        busy_s = (busy - self.busy0) / CLK_TCK
        return {
            "machine_busy_pct": round(100 * busy_s / cap, 1),
            "ours_pct": round(100 * ours / cap, 1),
            "others_pct": round(max(0.0, 100 * (busy_s - ours) / cap), 1),
            "steal_pct": round(100 * (steal - self.steal0) / CLK_TCK / cap, 1),
        }


def on_term(signum, frame):
    """SIGTERM (run_map.sh's timeout) unwinds through main's finally, which stops the engine."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends us for good
    raise SystemExit(128 + signum)


def run_quiet(argv, **kw):
    """A command whose output goes to our stderr (stdout is the JSON line's)."""
    return subprocess.run(argv, stdout=sys.stderr, stderr=sys.stderr, **kw)


def endpoint_section(config_text):
    """The [[endpoint]] table of a node's config.toml, with its sub-tables."""
    if "[[endpoint]]" not in config_text:
        return None
    lines = config_text[config_text.index("[[endpoint]]"):].splitlines()
    kept = [lines[0]]
    for line in lines[1:]:
        if line.startswith("[") and not line.startswith("[endpoint."):
            break
        kept.append(line)
    return "\n".join(kept).strip()


def funcmesh_version(binary):
    out = subprocess.run([binary, "--version"], capture_output=True, text=True)
    version = out.stdout.strip() or "funcmesh ?"
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        if commit:
            version += " (tree at %s%s)" % (commit, ", modified" if dirty else "")
    except OSError:
        pass
    return version


# --------------------------------------------------------------------------- engines
#
# Each engine has: version, config (dict), start() which returns when the engine's own "ready"
# signal says the 2 workers are there; ex (an executor); submit(x) -> a future with .result();
# map_variants: [(name, api string, fn(iterable) -> iterator or list)], the first the one
# reported as "the" map; latency_api; stop(); markers (strings in the command lines of its
# processes, for the stray check).


class Funcmesh:
    name = "funcmesh"

    def __init__(self, workers, tmp, binary):
        if not binary or not os.path.exists(binary):
            raise RuntimeError("no funcmesh binary (--funcmesh-bin or FUNCMESH_BIN): %r" % binary)
        sys.path.insert(0, os.path.join(REPO, "sdk", "python"))
        import cloudpickle
        import funcmesh

        self.funcmesh = funcmesh
        self.binary = binary
        self.workers = workers
        self.tmp = tmp
        self.net = os.path.join(tmp, "net")
        self.a1 = os.path.join(self.net, "a1")
        self.ex = None
        self.up = False
        self.markers = [tmp]
        self.version = "%s; funcmesh SDK %s (sdk/python), cloudpickle %s" % (
            funcmesh_version(binary), funcmesh.__version__, cloudpickle.__version__)
        self.latency_api = "funcmesh.Executor.submit(noop, i).result()"
        self.map_variants = [(
            "map",
            "funcmesh.Executor.map(noop, range(N)): submits in batches of batch_size (256), "
            "one POST /v1/tasks per batch, then yields results in order as the node pushes "
            "them (/v1/tasks/events)",
            lambda it: self.ex.map(noop, it),
        )]
        self.config = {
            "testnet": "funcmesh testnet up --institutions 1 --nodes-per-institution 1 "
            "(coordinator + a1; a1's endpoint runs the tasks, the client talks to a1's API)",
            "endpoint": "a1's endpoint: host_user = \"node\", python = %s (this venv), "
            "max_workers = %d" % (sys.executable, workers),
            "executor": "funcmesh.Executor(node=a1), batch_size=256 (default)",
        }

    def start(self):
        b = self.binary
        run_quiet([b, "testnet", "up", "--dir", self.net, "--institutions", "1",
                   "--nodes-per-institution", "1"], check=True)
        self.up = True
        path = os.path.join(self.a1, "config.toml")
        with open(path) as f:
            text = f.read()

        # The node writes every setting: the endpoint's workers run as the node's user (not an
        # isolated uid of their own, which needs root and a python anyone may run) in this
        # interpreter, which has the cloudpickle that pickled the calls.
        def replace(text, old, new):
            if text.count(old) != 1:
                raise RuntimeError("%r is not in %s once:\n%s" % (old, path, text))
            return text.replace(old, new)

        text = replace(text, 'host_user = "auto"\n', 'host_user = "node"\n')
        text = replace(text, 'python = "python3"\n', "python = %s\n" % json.dumps(sys.executable))
        if text.count("max_workers = %d\n" % self.workers) != 1:
            raise RuntimeError("a1's endpoint does not have max_workers = %d:\n%s"
                               % (self.workers, text))
        self.config["a1_endpoint_section"] = endpoint_section(text)
        run_quiet([b, "testnet", "kill", "--dir", self.net, "a1"], check=True)
        with open(path, "w") as f:
            f.write(text)
        run_quiet([b, "testnet", "restart", "--dir", self.net, "a1"], check=True)

        def listed():
            out = subprocess.run([b, "endpoint", "list", "--node", self.a1, "--json"],
                                 capture_output=True, text=True)
            return out.returncode == 0 and any(e.get("peer_id") for e in json.loads(out.stdout))

        wait_for("a1's endpoint in its registry", listed, 60, 0.2)
        self.ex = self.funcmesh.Executor(node=self.a1)

    def submit(self, x):
        return self.ex.submit(noop, x)

    def first(self, x):
        # Until the endpoint's first advert arrives the task is not routable (refused at
        # submit): try again, as a user would.
        deadline = time.monotonic() + 60
        while True:
            try:
                return self.submit(x).result(timeout=60)
            except self.funcmesh.FuncmeshError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self):
        try:
            if self.ex is not None:
                self.ex.shutdown(wait=False)
        finally:
            if self.up:
                run_quiet([self.binary, "testnet", "down", "--dir", self.net])


class Dask:
    name = "dask"

    def __init__(self, workers, tmp, binary=None):
        import dask
        import distributed

        self.version = "dask %s, distributed %s" % (dask.__version__, distributed.__version__)
        self.workers = workers
        self.tmp = tmp
        self.markers = [tmp]
        self.client = self.cluster = self.ex = None
        self.latency_api = "ClientExecutor.submit(noop, i).result()"
        self.map_variants = [(
            "map",
            "ClientExecutor.map(noop, range(N)) = client.map(noop, range(N), pure=False) "
            "(all submitted at once), results yielded in order",
            lambda it: self.ex.map(noop, it),
        )]
        self.config = {
            "cluster": "LocalCluster(n_workers=%d, threads_per_worker=1, processes=True, "
            "dashboard_address=None, host=127.0.0.1)" % workers,
            "executor": "Client(cluster).get_executor(pure=False): distributed.cfexecutor."
            "ClientExecutor, a concurrent.futures.Executor (pure=False: every call runs, none "
            "is deduplicated by its arguments' hash)",
            "scheduler": "in the client process (LocalCluster default)",
        }

    def start(self):
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(
            n_workers=self.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
            local_directory=self.tmp,
        )
        self.client = Client(self.cluster)
        self.client.wait_for_workers(self.workers)
        self.ex = self.client.get_executor(pure=False)

    def submit(self, x):
        return self.ex.submit(noop, x)

    def first(self, x):
        return self.submit(x).result()

    def stop(self):
        try:
            if self.ex is not None:
                self.ex.shutdown(wait=False)
        finally:
            if self.client is not None:
                self.client.close()
            if self.cluster is not None:
                self.cluster.close()


class Parsl:
    name = "parsl"

    def __init__(self, workers, tmp, binary=None):
        import parsl
        from parsl.concurrent import ParslPoolExecutor

        self.parsl = parsl
        self.ParslPoolExecutor = ParslPoolExecutor
        self.version = "parsl %s" % parsl.__version__
        self.workers = workers
        self.tmp = tmp
        self.markers = [tmp]
        self.ex = self.htex = None
        self.latency_api = "ParslPoolExecutor.submit(noop, i).result()"
        self.map_variants = [(
            "map",
            "ParslPoolExecutor.map(noop, range(N)): one python_app call per element, all "
            "submitted at once through the DataFlowKernel, results yielded in order",
            lambda it: self.ex.map(noop, it),
        )]

    def start(self):
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor
        from parsl.providers import LocalProvider

        self.htex = HighThroughputExecutor(
            label="htex_local",
            address="127.0.0.1",
            max_workers_per_node=self.workers,
            cores_per_worker=1,
            worker_logdir_root=os.path.join(self.tmp, "workers"),
            provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1, nodes_per_block=1),
        )
        self.config = {
            "executor": "parsl.concurrent.ParslPoolExecutor(config=Config(executors=["
            "HighThroughputExecutor(address=127.0.0.1, max_workers_per_node=%d, "
            "cores_per_worker=1, LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1))], "
            "strategy='none'))" % self.workers,
            "encrypted": bool(getattr(self.htex, "encrypted", False)),
        }
        self.ex = self.ParslPoolExecutor(config=Config(
            executors=[self.htex],
            run_dir=self.tmp,
            strategy="none",
            usage_tracking=0,
            initialize_logging=True,  # to parsl.log under run_dir, not stderr
        ))
        # Ready = the interchange reports the managers' workers (2) connected.
        htex = self.htex
        deadline = time.monotonic() + 120
        while True:
            try:
                n = sum(m.get("worker_count", 0) for m in htex.connected_managers())
            except Exception:  # command channel not up yet
                n = 0
            if n >= self.workers:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("HTEX: only %d of %d workers connected after 120 s"
                                   % (n, self.workers))
            time.sleep(0.01)

    def submit(self, x):
        return self.ex.submit(noop, x)

    def first(self, x):
        return self.submit(x).result()

    def stop(self):
        if self.ex is not None:
            self.ex.shutdown(wait=False)  # dfk.cleanup(): scales the block in, ends HTEX
            self.parsl.clear()


class Ray:
    name = "ray"

    def __init__(self, workers, tmp, binary=None):
        import ray

        self.ray = ray
        self.version = "ray %s" % ray.__version__
        self.workers = workers
        self.tmp = tmp
        self.markers = [tmp, "ray::"]
        self.pool = None
        # 256 MiB: no-op tasks store nothing; Ray's default is 30% of RAM in /dev/shm.
        osm = os.environ.get("FUNCMESH_BENCH_RAY_OBJECT_STORE", str(256 << 20))
        self.object_store_memory = None if osm == "default" else int(osm)
        self.latency_api = "Pool.apply_async(noop, (i,)).get()"
        self.map_variants = [
            ("map",
             "Pool.map(noop, range(N), chunksize=1): one actor call per element, all "
             "submitted at once, returns the list (so its first result is its last)",
             lambda it: self.pool.map(noop, it, chunksize=1)),
            ("imap",
             "Pool.imap(noop, range(N)) (chunksize=1, its default): a lazy ordered iterator "
             "that keeps one call per actor in flight",
             lambda it: self.pool.imap(noop, it)),
            ("map default chunks",
             "Pool.map(noop, range(N)) with its default chunksize, ceil(N / (4 x 2 actors)): "
             "8 actor calls of N/8 no-ops each, not one task per element",
             lambda it: self.pool.map(noop, it)),
        ]
        self.config = {
            "init": "ray.init(address='local', num_cpus=%d, include_dashboard=False, "
            "object_store_memory=%s, _node_ip_address=127.0.0.1)"
            % (workers, "default" if self.object_store_memory is None
               else "%d MiB" % (self.object_store_memory >> 20)),
            "executor": "ray.util.multiprocessing.Pool(processes=%d): %d PoolActor actors (one "
            "process each); Ray 2.60 has no concurrent.futures.Executor" % (workers, workers),
        }

    def start(self):
        ray = self.ray
        ray.init(
            address="local",
            num_cpus=self.workers,
            num_gpus=0,
            include_dashboard=False,
            object_store_memory=self.object_store_memory,
            _node_ip_address="127.0.0.1",
            _temp_dir=self.tmp,
            log_to_driver=False,
            configure_logging=True,
            logging_level="WARNING",
        )
        # ray.init installs its own SIGTERM handler: put ours back so a timeout still cleans up.
        signal.signal(signal.SIGTERM, on_term)
        from ray.util.multiprocessing import Pool

        # Returns once both actors answered a ping: the pool's own "ready".
        self.pool = Pool(processes=self.workers)

    def submit(self, x):
        return _AsyncResultFuture(self.pool.apply_async(noop, (x,)))

    def first(self, x):
        return self.submit(x).result()

    def stop(self):
        try:
            if self.pool is not None:
                self.pool.terminate()
        finally:
            self.ray.shutdown()


class _AsyncResultFuture:
    """Ray's AsyncResult seen as a future (.result())."""

    def __init__(self, r):
        self.r = r

    def result(self, timeout=None):
        return self.r.get(timeout)


class GlobusCompute:
    name = "globus-compute"

    def __init__(self, workers, tmp, binary, default_burst_samples=8):
        if not binary or not os.path.exists(binary):
            raise RuntimeError("no funcmesh binary (--funcmesh-bin or FUNCMESH_BIN): %r" % binary)
        import dill
        import globus_compute_sdk

        sys.path.insert(0, os.path.join(REPO, "sdk", "python", "tests"))
        import globus_compute_env

        self.env_mod = globus_compute_env
        self.sdk = globus_compute_sdk
        self.binary = binary
        self.workers = workers
        self.tmp = tmp
        self.markers = [tmp]
        self.broker = self.node = self.ex = None
        self.default_burst_samples = default_burst_samples
        self.version = "globus-compute-sdk %s (dill %s) against %s" % (
            globus_compute_sdk.__version__, dill.__version__, funcmesh_version(binary))
        self.latency_api = "globus_compute_sdk.Executor.submit(noop, i).result()"
        self.map_variants = [(
            "map",
            "concurrent.futures.Executor.map(gce, noop, range(N)): the base class's map over "
            "the SDK Executor's submit (its own map raises NotImplementedError); the SDK's "
            "submitter thread coalesces queued submits into batches of batch_size (128), one "
            "POST /v3/endpoints/{id}/submit each; results come over AMQP",
            lambda it: concurrent.futures.Executor.map(self.ex, noop, it),
        )]
        self.config = {
            "node": "funcmesh testnet (coordinator + a1) with compat.globus_compute = true on "
            "127.0.0.1:5000 and compat.amqp_url = a private rabbitmq-server "
            "(sdk/python/tests/globus_compute_env.py's Node and RabbitMQ)",
            "endpoint": "a1's endpoint: host_user = \"node\", python = %s (the SDK's venv), "
            "max_workers = %d" % (sys.executable, workers),
            "executor": "globus_compute_sdk.Executor(endpoint_id=a1's endpoint, batch_size=128 "
            "(default), api_burst_limit=1)",
            "api_burst_limit": "1: the SDK counts toward its client-side rate limit only "
            "submissions of fewer than api_burst_limit tasks, so 1 turns it off; with its "
            "defaults (4 per 16 s) sequential single-task round trips are paced at one per "
            "~4-5 s after the first 4 (latency_sdk_defaults measures that)",
            "result_watcher": "the SDK's _ResultWatcher (one AMQP consumer thread) matches the "
            "results it received to futures on a timer, every poll_period_s = 0.5 s (not "
            "settable through the Executor)",
        }

    def start(self):
        env = self.env_mod
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 5000))
            except OSError:
                raise RuntimeError("127.0.0.1:5000 is taken: the SDK's 'local' environment "
                                   "must reach the node there") from None
        self.broker = env.RabbitMQ()
        self.markers.append(self.broker.dir)
        self.node = _GcNode(self.binary, sys.executable, self.broker.url)
        self.markers.append(self.node.tmp)
        os.environ.update(self.node.env)
        from globus_compute_sdk import Client, Executor

        self.Executor = Executor
        self.client = Client()
        ep = self.node.endpoint_id
        wait_for("the endpoint online to the SDK",
                 lambda: self.client.get_endpoint_status(ep)["status"] == "online", 60, 0.2)
        self.config["a1_endpoint_section"] = self.node.endpoint_section
        self.ex = Executor(endpoint_id=ep, client=self.client, api_burst_limit=1)

    def submit(self, x):
        return self.ex.submit(noop, x)

    def first(self, x):
        return self.submit(x).result(timeout=120)

    def extra(self, result):
        """Single round trips with the SDK's default rate limit (api_burst_limit=4,
        api_burst_window_s=16), as a script that leaves them gets them."""
        n = self.default_burst_samples
        if not n:
            return
        ex = self.Executor(endpoint_id=self.node.endpoint_id, client=self.client)
        try:
            samples = []
            for i in range(n):
                t = time.perf_counter()
                ex.submit(noop, i).result(timeout=120)
                samples.append(time.perf_counter() - t)
        finally:
            ex.shutdown(wait=False, cancel_futures=True)
        result["latency_sdk_defaults"] = {
            "api": "Executor(endpoint_id) with the SDK's defaults (api_burst_limit=4, "
            "api_burst_window_s=16): submit(noop, i).result(), %d times" % n,
            "samples_ms": [round(s * 1000, 1) for s in samples],
        }

    def stop(self):
        try:
            if self.ex is not None:
                self.ex.shutdown(wait=False, cancel_futures=True)
        finally:
            try:
                if self.node is not None:
                    self.node.stop()
            finally:
                if self.broker is not None:
                    self.broker.stop()


def _GcNode(binary, python, amqp_url):
    """globus_compute_env.Node, with a1's endpoint's workers running as the node's user, as in
    the funcmesh engine (the Node class leaves host_user = "auto": isolated uids when root)."""
    import globus_compute_env

    class Node(globus_compute_env.Node):
        def _serve_globus_compute(self, python, amqp_url, listen):
            # The base method kills a1, rewrites its config.toml and restarts it; a1 reads the
            # file only when it starts, so host_user is rewritten here, before that.
            path = os.path.join(self.a1, "config.toml")
            with open(path) as f:
                text = f.read()
            if text.count('host_user = "auto"\n') != 1:
                raise RuntimeError('host_user = "auto" is not in %s once:\n%s' % (path, text))
            with open(path, "w") as f:
                f.write(text.replace('host_user = "auto"\n', 'host_user = "node"\n'))
            super()._serve_globus_compute(python, amqp_url, listen)
            with open(path) as f:
                text = f.read()
            if 'host_user = "node"\n' not in text or "max_workers = 2\n" not in text:
                raise RuntimeError("a1 restarted without host_user = \"node\" or max_workers "
                                   "= 2:\n%s" % text)
            self.endpoint_section = endpoint_section(text)

    return Node(binary, python, amqp_url)


ENGINES = {
    "funcmesh": Funcmesh,
    "dask": Dask,
    "parsl": Parsl,
    "ray": Ray,
    "globus-compute": GlobusCompute,
}


# --------------------------------------------------------------------------- measuring


def run_map(fn, n, offset):
    """Consumes fn(range(offset, offset + n)); returns (call_s, first_s, wall_s)."""
    t0 = time.perf_counter()
    it = fn(range(offset, offset + n))
    t_call = time.perf_counter()
    it = iter(it)
    count = 0
    first = None
    for r in it:
        if count == 0:
            first = time.perf_counter()
        if r is not None:
            raise AssertionError("noop returned %r" % (r,))
        count += 1
    t_end = time.perf_counter()
    if count != n:
        raise AssertionError("map gave %d results for %d calls" % (count, n))
    return t_call - t0, (first or t_end) - t0, t_end - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", required=True, choices=sorted(ENGINES))
    ap.add_argument("--tasks", type=int, default=10_000, help="map: calls (N)")
    ap.add_argument("--latency-samples", type=int, default=200, help="latency: round trips (M)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--warmup-tasks", type=int, default=None,
                    help="calls in the warm-up map (default min(N, 1000))")
    ap.add_argument("--warmup-latency", type=int, default=50, help="warm-up round trips")
    ap.add_argument("--funcmesh-bin", default=os.environ.get("FUNCMESH_BIN"),
                    help="the funcmesh binary (funcmesh and globus-compute engines)")
    ap.add_argument("--gc-default-burst-samples", type=int, default=8,
                    help="globus-compute: single round trips with the SDK's default rate limit")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the engine's temp/log dir")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args()

    # Everything that anything (engines, their children) prints goes to stderr; the result is
    # written to the saved stdout.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    # Parsl's helper scripts (process_worker_pool.py, interchange.py) are looked up on PATH.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    signal.signal(signal.SIGTERM, on_term)

    before = set(proc_table())
    tmp = tempfile.mkdtemp(prefix="fm-map-%s-" % args.engine)
    result = {
        "engine": args.engine,
        "workers": args.workers,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "host": {
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "loadavg_1m_before": round(os.getloadavg()[0], 2),
        },
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    eng = None
    markers = [tmp]
    t_start = time.perf_counter()
    stage = "import"
    try:
        cls = ENGINES[args.engine]
        if cls is GlobusCompute:
            eng = cls(args.workers, tmp, args.funcmesh_bin, args.gc_default_burst_samples)
        else:
            eng = cls(args.workers, tmp, args.funcmesh_bin)
        result["version"] = eng.version
        stage = "start"
        t0 = time.perf_counter()
        eng.start()
        markers = eng.markers
        result["startup_s"] = round(time.perf_counter() - t0, 3)
        ex = eng.pool if isinstance(eng, Ray) else eng.ex
        result["executor"] = "%s.%s" % (type(ex).__module__, type(ex).__qualname__)
        stage = "first task"
        eng.first(-1)
        result["first_result_s"] = round(time.perf_counter() - t0, 3)
        result["config"] = eng.config

        stage = "warm-up"
        warm_n = args.warmup_tasks if args.warmup_tasks is not None else min(args.tasks, 1000)
        for i in range(args.warmup_latency):
            eng.submit(i).result()
        if warm_n:
            run_map(eng.map_variants[0][2], warm_n, 10_000_000)

        cpu = CpuMeter(our_new_processes(before, markers))
        result["cpu_pct"] = cpu_report = {}

        stage = "latency"
        samples = []
        cpu.start()
        for i in range(args.latency_samples):
            t = time.perf_counter()
            eng.submit(i).result()
            samples.append(time.perf_counter() - t)
        cpu_report["latency"] = cpu.stop()
        result["latency_api"] = eng.latency_api
        result["latency_samples"] = len(samples)
        result["latency_ms"] = latency_stats(samples) if samples else None

        stage = "map"
        result["tasks"] = args.tasks
        maps = []
        for k, (name, api, fn) in enumerate(eng.map_variants):
            stage = "map (%s)" % name
            cpu.start()
            call_s, first_s, wall_s = run_map(fn, args.tasks, 20_000_000 + k * args.tasks)
            cpu_used = cpu.stop()
            maps.append({
                "name": name,
                "api": api,
                "call_s": round(call_s, 3),
                "first_result_s": round(first_s, 3),
                "wall_s": round(wall_s, 3),
                "tasks_per_s": round(args.tasks / wall_s, 1) if wall_s > 0 else None,
                "cpu_pct": cpu_used,
            })
            if k == 0:
                result["map_api"] = api
                result["map_call_s"] = round(call_s, 3)
                result["map_first_result_s"] = round(first_s, 3)
                result["map_wall_s"] = round(wall_s, 3)
                result["map_tasks_per_s"] = maps[0]["tasks_per_s"]
                cpu_report["map"] = cpu_used
        if len(maps) > 1:
            result["map_variants"] = maps[1:]
        result["loadavg_1m_after"] = round(os.getloadavg()[0], 2)

        if hasattr(eng, "extra"):
            stage = "extra"
            eng.extra(result)

        # What the running cluster is made of (besides this driver process), and its memory.
        procs = our_new_processes(before, markers)
        result["cluster_processes"] = len(procs)
        result["rss_mib"] = {
            "driver": round(rss_bytes(os.getpid()) / 2**20, 1),
            "cluster": round(sum(rss_bytes(p["pid"]) for p in procs) / 2**20, 1),
        }
        result["cluster_process_names"] = sorted(proc_name(p["cmd"]) for p in procs)
    except BaseException as e:  # noqa: BLE001 - reported in the JSON
        result["error"] = "%s during %s: %s" % (type(e).__name__, stage, e)
        traceback.print_exc()
    finally:
        if eng is not None:
            markers = getattr(eng, "markers", markers)
        t = time.perf_counter()
        if eng is not None:
            # In a thread, so that a shutdown that hangs still lets us end the engine's
            # processes below and print the result.
            def stop():
                try:
                    eng.stop()
                except BaseException as e:  # noqa: BLE001
                    result.setdefault("error", "%s during shutdown: %s" % (type(e).__name__, e))
                    traceback.print_exc()

            th = threading.Thread(target=stop, name="engine-stop", daemon=True)
            th.start()
            th.join(SHUTDOWN_TIMEOUT_S)
            if th.is_alive():
                result.setdefault("error", "shutdown still running after %d s" % SHUTDOWN_TIMEOUT_S)
                faulthandler.dump_traceback(all_threads=True)
        result["shutdown_s"] = round(time.perf_counter() - t, 3)

        # Give exiting processes a moment, then list and end whatever the engine left behind.
        strays = []
        for _ in range(50):
            strays = our_new_processes(before, markers)
            if not strays:
                break
            time.sleep(0.1)
        result["stray_processes"] = strays
        if strays:
            print("executor_map.py: %d process(es) left after shutdown, ending them: %s"
                  % (len(strays), strays), file=sys.stderr)
            for p in strays:
                try:
                    os.kill(p["pid"], signal.SIGKILL)
                except OSError:
                    pass
        result["total_wall_s"] = round(time.perf_counter() - t_start, 3)
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            result["tmp"] = tmp

    out.write(json.dumps(result) + "\n" if args.json else json.dumps(result, indent=2) + "\n")
    out.flush()
    # Exit without the engines' atexit hooks (they were stopped above); os._exit also avoids
    # hangs in interpreter shutdown with engine threads still alive.
    os._exit(1 if "error" in result else 0)


if __name__ == "__main__":
    main()
