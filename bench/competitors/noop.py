#!/usr/bin/env python3
"""No-op task benchmark of an incumbent Python task engine on a local 2-worker cluster.

    python noop.py --engine dask|parsl|parsl-htex|ray --tasks N --latency-samples M --json

For the chosen engine: start a local cluster with exactly 2 worker processes, warm up, then
  1. latency: submit one no-op task, wait for its result, repeat M times (p50/p99/mean ms);
  2. throughput: submit N no-op tasks through the engine's normal (batched where it has one)
     client API, wait for all, report tasks/s;
then shut the cluster down and check that none of the processes it started is left.

Engines:
  dask        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True);
              latency: client.submit(...).result(); throughput: client.map + client.gather
  parsl       HighThroughputExecutor, LocalProvider, 1 block, max_workers_per_node=2, through
              the DataFlowKernel (@python_app), as a Parsl user writes it
  parsl-htex  the same executor driven directly with HighThroughputExecutor.submit(func, {}, x),
              no DataFlowKernel: how a Globus Compute endpoint's engine drives HTEX
  ray         ray.init(num_cpus=2) (local head: GCS + raylet, dashboard off);
              latency: ray.get(f.remote(x)); throughput: ray.get([f.remote(x) ...])

The task is the same everywhere: `def noop(x): return None`, with x an int.

With --json the only thing on stdout is one JSON object (one line); everything the engines
print goes to stderr. On failure the object has an "error" field and the exit code is 1.
"""

import argparse
import faulthandler
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback


def noop(x):
    return None


SHUTDOWN_TIMEOUT_S = 60


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
    for w in words:
        base = os.path.basename(w)
        if base.endswith((".py", ".sh")) or base in ("raylet", "gcs_server", "plasma_store"):
            return (prog + " " + base if base.endswith(".sh") else base)[:40]
    return " ".join(os.path.basename(w) for w in words[:2])


class CpuMeter:
    """How busy the machine was during a phase, and how much of that was not us: system-wide
    busy time from /proc/stat minus the CPU time of this process and the cluster's processes."""

    def __init__(self, procs):
        import psutil

        self.procs = [psutil.Process()]
        for p in procs:
            try:
                self.procs.append(psutil.Process(p["pid"]))
            except psutil.Error:
                pass
        self.hz = os.sysconf("SC_CLK_TCK")
        self.ncpu = os.cpu_count() or 1

    def _ours(self):
        total = 0.0
        for p in self.procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:
                pass
        return total

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
        busy_s = (busy - self.busy0) / self.hz
        return {
            "machine_busy_pct": round(100 * busy_s / cap, 1),
            "ours_pct": round(100 * ours / cap, 1),
            "others_pct": round(max(0.0, 100 * (busy_s - ours) / cap), 1),
            "steal_pct": round(100 * (steal - self.steal0) / self.hz / cap, 1),
        }


def our_new_processes(before_pids, marker_paths):
    """Processes that did not exist before the engine started and that belong to it: their
    command line names this venv / the engine's temp dir, or they descend from us."""
    import psutil

    me = os.getpid()
    found = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline", "create_time"]):
        try:
            if p.info["pid"] in before_pids or p.info["pid"] == me:
                continue
            if p.status() == psutil.STATUS_ZOMBIE:
                continue  # already dead, waiting to be reaped by its parent
            cmd = " ".join(p.info["cmdline"] or [])
            if "multiprocessing.resource_tracker" in cmd and p.info["ppid"] == me:
                continue  # this interpreter's own stdlib helper; exits with us
            is_child = False
            try:
                is_child = any(a.pid == me for a in p.parents())
            except psutil.Error:
                pass
            if is_child or any(m and m in cmd for m in marker_paths):
                found.append({"pid": p.info["pid"], "cmd": cmd[:160],
                              "rss": p.memory_info().rss})
        except psutil.Error:
            continue
    return found


def on_term(signum, frame):
    """SIGTERM (run.sh's timeout) unwinds through main's finally, which stops the cluster."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends us for good
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------- engines
#
# Each engine is a class with: version, config (dict, goes into the JSON), start() which
# returns when the engine's own "ready" signal says the 2 workers are there, one(x) -> result
# of a single round trip, many(n) -> waits for n tasks, latency_api / throughput_api strings,
# and stop().


class Dask:
    name = "dask"

    def __init__(self, workers, tmp):
        import dask
        import distributed

        self.version = "dask %s, distributed %s" % (dask.__version__, distributed.__version__)
        self.workers = workers
        self.tmp = tmp
        self.client = self.cluster = None
        self.latency_api = "client.submit(noop, i, pure=False).result()"
        self.throughput_api = "client.gather(client.map(noop, range(N), pure=False))"
        self.config = {
            "cluster": "LocalCluster(n_workers=%d, threads_per_worker=1, processes=True, "
            "dashboard_address=None, host=127.0.0.1)" % workers,
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

    def one(self, x):
        return self.client.submit(noop, x, pure=False).result()

    def many(self, n, offset=0):
        futs = self.client.map(noop, range(offset, offset + n), pure=False)
        res = self.client.gather(futs)
        assert len(res) == n
        del futs

    def stop(self):
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


class Parsl:
    name = "parsl"

    def __init__(self, workers, tmp, direct=False):
        import parsl

        self.parsl = parsl
        self.version = "parsl %s" % parsl.__version__
        self.workers = workers
        self.tmp = tmp
        self.direct = direct
        self.dfk = None
        self.htex = None
        if direct:
            self.name = "parsl-htex"
            self.latency_api = "HighThroughputExecutor.submit(noop, {}, i).result()"
            self.throughput_api = "[htex.submit(noop, {}, i) for i in range(N)]; wait all"
        else:
            self.latency_api = "noop_app(i).result()  (@python_app through the DataFlowKernel)"
            self.throughput_api = "[noop_app(i) for i in range(N)]; wait all  (Parsl has no map)"

    def _make_executor(self):
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
            "executor": "HighThroughputExecutor(address=127.0.0.1, max_workers_per_node=%d, "
            "cores_per_worker=1, LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1))"
            % self.workers,
            "encrypted": bool(getattr(self.htex, "encrypted", False)),
            "driver": "direct executor.submit, no DataFlowKernel" if self.direct
            else "DataFlowKernel (parsl.load), strategy='none'",
        }
        return self.htex

    def start(self):
        htex = self._make_executor()
        if self.direct:
            htex.run_dir = self.tmp
            htex.provider.script_dir = self.tmp
            htex.start()
            # Without a DFK no job-status poller launches init_blocks: do what its first
            # strategy tick does.
            htex.scale_out_facade(htex.provider.init_blocks)
        else:
            from parsl.config import Config

            self.dfk = self.parsl.load(
                Config(
                    executors=[htex],
                    run_dir=self.tmp,
                    strategy="none",
                    usage_tracking=0,
                    initialize_logging=True,  # to parsl.log under run_dir, not stderr
                )
            )
            self.app = self.parsl.python_app(executors=["htex_local"])(noop)
        # Ready = the interchange reports the managers' workers (2) connected.
        deadline = time.monotonic() + 120
        while True:
            try:
                n = sum(m.get("worker_count", 0) for m in htex.connected_managers())
            except Exception:  # command channel not up yet
                n = 0
            if n >= self.workers:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("HTEX: only %d of %d workers connected after 120 s" % (n, self.workers))
            time.sleep(0.01)

    def _submit(self, x):
        if self.direct:
            return self.htex.submit(noop, {}, x)
        return self.app(x)

    def one(self, x):
        return self._submit(x).result()

    def many(self, n, offset=0):
        futs = [self._submit(offset + i) for i in range(n)]
        for f in futs:
            f.result()

    def stop(self):
        if self.direct:
            if self.htex is not None:
                # What the DFK's cleanup does: scale every block in (ends the worker pool),
                # then shut the executor and its interchange down.
                try:
                    self.htex.scale_in_facade(len(self.htex.status_facade))
                finally:
                    self.htex.shutdown()
        elif self.dfk is not None:
            self.parsl.dfk().cleanup()
            self.parsl.clear()


class Ray:
    name = "ray"

    def __init__(self, workers, tmp):
        import ray

        self.ray = ray
        self.version = "ray %s" % ray.__version__
        self.workers = workers
        self.tmp = tmp
        self.latency_api = "ray.get(noop.remote(i))"
        self.throughput_api = "ray.get([noop.remote(i) for i in range(N)])"
        # 256 MiB: no-op tasks store nothing; Ray's default is 30% of RAM (7 GiB here) in
        # /dev/shm. FUNCMESH_BENCH_RAY_OBJECT_STORE=<bytes> or =default overrides.
        osm = os.environ.get("FUNCMESH_BENCH_RAY_OBJECT_STORE", str(256 << 20))
        self.object_store_memory = None if osm == "default" else int(osm)
        self.config = {
            "init": "ray.init(address='local', num_cpus=%d, include_dashboard=False, "
            "object_store_memory=%s, _node_ip_address=127.0.0.1)"
            % (workers, "default" if self.object_store_memory is None
               else "%d MiB" % (self.object_store_memory >> 20)),
            "note": "each task needs 1 CPU: at most %d tasks run at once, in %d worker processes"
            % (workers, workers),
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
        self.f = ray.remote(num_cpus=1)(noop)
        # ray.init installs its own SIGTERM handler (it exits without shutting the cluster
        # down, leaving its agents behind): put ours back so a timeout still cleans up.
        signal.signal(signal.SIGTERM, on_term)
        # ray.init returns when GCS and raylet are up; workers start in the background and are
        # waited for by the first task (counted in first_result_s, not in startup_s).

    def one(self, x):
        return self.ray.get(self.f.remote(x))

    def many(self, n, offset=0):
        res = self.ray.get([self.f.remote(offset + i) for i in range(n)])
        assert len(res) == n

    def stop(self):
        self.ray.shutdown()


def make_engine(name, workers, tmp):
    if name == "dask":
        return Dask(workers, tmp)
    if name == "parsl":
        return Parsl(workers, tmp)
    if name == "parsl-htex":
        return Parsl(workers, tmp, direct=True)
    if name == "ray":
        return Ray(workers, tmp)
    raise SystemExit("unknown engine %r" % name)


# --------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", required=True, choices=["dask", "parsl", "parsl-htex", "ray"])
    ap.add_argument("--tasks", type=int, default=5000, help="throughput: tasks in the batch (N)")
    ap.add_argument("--latency-samples", type=int, default=500, help="latency: round trips (M)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--warmup-tasks", type=int, default=None,
                    help="tasks in the warm-up batch (default min(N, 1000))")
    ap.add_argument("--warmup-latency", type=int, default=50, help="warm-up round trips")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the engine's temp/log dir")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args()

    # Everything that anything (engines, their children) prints goes to stderr; the result is
    # written to the saved stdout.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    # The engines' helper scripts (Parsl's process_worker_pool.py, interchange.py) are looked
    # up on PATH: put this interpreter's bin dir first.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    signal.signal(signal.SIGTERM, on_term)

    import psutil

    before = set(psutil.pids())
    tmp = tempfile.mkdtemp(prefix="fm-bench-%s-" % args.engine)
    result = {
        "engine": args.engine,
        "workers": args.workers,
        "python": platform.python_version(),
        "host": {
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "loadavg_1m_before": round(os.getloadavg()[0], 2),
        },
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    eng = None
    t_start = time.perf_counter()
    stage = "import"
    try:
        eng = make_engine(args.engine, args.workers, tmp)
        result["version"] = eng.version
        stage = "start"
        t0 = time.perf_counter()
        eng.start()
        result["startup_s"] = round(time.perf_counter() - t0, 3)
        stage = "first task"
        eng.one(-1)
        result["first_result_s"] = round(time.perf_counter() - t0, 3)
        if hasattr(eng, "config"):
            result["config"] = eng.config

        stage = "warm-up"
        warm_n = args.warmup_tasks if args.warmup_tasks is not None else min(args.tasks, 1000)
        for i in range(args.warmup_latency):
            eng.one(i)
        if warm_n:
            eng.many(warm_n, offset=10_000_000)

        markers = [sys.prefix, tmp] + (["ray::"] if args.engine == "ray" else [])
        cpu = CpuMeter(our_new_processes(before, markers))
        result["cpu_pct"] = cpu_report = {}

        stage = "latency"
        samples = []
        cpu.start()
        for i in range(args.latency_samples):
            t = time.perf_counter()
            eng.one(i)
            samples.append(time.perf_counter() - t)
        cpu_report["latency"] = cpu.stop()
        result["latency_api"] = eng.latency_api
        result["latency_samples"] = len(samples)
        result["latency_ms"] = latency_stats(samples) if samples else None

        stage = "throughput"
        cpu.start()
        t = time.perf_counter()
        eng.many(args.tasks, offset=20_000_000)
        dt = time.perf_counter() - t
        cpu_report["throughput"] = cpu.stop()
        result["throughput_api"] = eng.throughput_api
        result["tasks"] = args.tasks
        result["throughput_wall_s"] = round(dt, 3)
        result["throughput_tasks_per_s"] = round(args.tasks / dt, 1) if dt > 0 else None
        result["loadavg_1m_after"] = round(os.getloadavg()[0], 2)

        # What the running cluster is made of (besides this driver process), and its memory.
        procs = our_new_processes(before, markers)
        me_rss = psutil.Process().memory_info().rss
        result["cluster_processes"] = len(procs)
        result["rss_mib"] = {
            "driver": round(me_rss / 2**20, 1),
            "cluster": round(sum(p["rss"] for p in procs) / 2**20, 1),
        }
        result["cluster_process_names"] = sorted(proc_name(p["cmd"]) for p in procs)
    except BaseException as e:  # noqa: BLE001 - reported in the JSON
        result["error"] = "%s during %s: %s" % (type(e).__name__, stage, e)
        traceback.print_exc()
    finally:
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
        markers = [sys.prefix, tmp] + (["ray::"] if args.engine == "ray" else [])
        strays = []
        for _ in range(50):
            strays = our_new_processes(before, markers)
            if not strays:
                break
            time.sleep(0.1)
        for p in strays:
            p.pop("rss", None)
        result["stray_processes"] = strays
        if strays:
            print("noop.py: %d process(es) left after shutdown, ending them: %s"
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

    if args.json:
        out.write(json.dumps(result) + "\n")
    else:
        out.write(json.dumps(result, indent=2) + "\n")
    out.flush()
    # Exit without running the engines' atexit hooks a second time (they were stopped above);
    # os._exit also avoids hangs in interpreter shutdown with engine threads still alive.
    os._exit(1 if "error" in result else 0)


if __name__ == "__main__":
    main()
