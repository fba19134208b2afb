"""funcmesh worker: runs Python and shell tasks for an endpoint, over a framed pipe protocol.

The endpoint ships this file inside the funcmesh binary and starts it as `python3 worker.py`,
on the host or inside a container. It needs nothing but the Python standard library; when
`cloudpickle` is importable it also runs pickled functions and arguments from the SDK.

Protocol, version 1 (see compute/src/protocol.rs, which is the reference):
  every frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON.
  worker -> endpoint: {"op": "hello", "v": 1, "pid", "python", "cloudpickle"} once, then
                      {"op": "result", "id", "ok", "value" | "error", "run_us", "recycle"}
                      or, for a value over the task's inline_limit, {"op": "result", "id",
                      "ok": true, "spill": N, "run_us"} followed by the value's JSON as N raw
                      bytes (the endpoint stores it as a blob)
                      {"op": "put", "id", "spill": N} + N raw bytes: a function stores a file
                      {"op": "get", "id", "ref": {"blake3", "size"}, "from"?}: a function wants
                      a blob (from the member `from`, else the task's submitter)
  endpoint -> worker: {"op": "run", "tasks": [task, ...]}  a batch, run in order
                      {"op": "blob", "ref" | "size" (+ that many raw bytes) | "error"}: the
                      answer to a put or a get
                      {"op": "cancel", "ids": [...]}       skip these if not started yet
                      {"op": "exit"}
  task: {"id", "fid", "fn" (only the first time this worker sees fid), "args", "kwargs",
         "encoding": "json" | "pickle", "timeout_ms", "memory_mb", "result_limit",
         "inline_limit" (0: never spill), "output_cap"}
The task's own stdout is redirected to stderr: the protocol pipe is private to the worker.

Functions reach the blob store through the module `funcmesh_blobs`, which this worker provides:
`put(path)` stores a file and returns its reference, `get(ref)` fetches a blob (from the task's
submitter, unless the endpoint's node holds it) into a file and returns its path.
"""

import base64
import collections
import io
import json
import linecache
import os
import select
import shlex
import signal
import struct
import subprocess
import sys
import time
import traceback

VERSION = 1
MAX_FRAME = 512 << 20  # arguments by reference (at most 256 MiB of JSON) and their envelope

try:
    # Found, not imported: importing it costs tens of milliseconds of every cold start, and
    # only pickled tasks need it.
    import importlib.util

    HAVE_CLOUDPICKLE = importlib.util.find_spec("cloudpickle") is not None
except Exception:  # pragma: no cover - depends on the environment
    HAVE_CLOUDPICKLE = False

try:
    import resource
except Exception:  # pragma: no cover
    resource = None


# What `Channel.read` returns when it must not wait and no whole frame has arrived.
NOTHING = object()

# Compact JSON. `json.dumps` with any argument builds a new encoder on every call: one, kept.
dumps = json.JSONEncoder(separators=(",", ":")).encode

# While a batch runs, the pipe is looked at again (for cancels and more work) before the next
# task once this long has passed since the last look: before every task of a batch of real
# work, and every few dozen no-op tasks rather than with a system call each.
POLL_EVERY = 0.0002


class Channel:
    """The protocol pipe: frames in on stdin, frames out on a private copy of stdout."""

    def __init__(self):
        # Read straight from the descriptor into our own buffer, so that `select` tells the
        # truth about whether more input is waiting (a buffered reader may hold it unseen).
        self.rfd = os.dup(0)
        self.buf = bytearray()
        self.eof = False
        self.tx = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
        # Whatever the task prints goes to stderr, never into the protocol.
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self.pending = 0
        self.first_pending = 0.0
        # Frames that arrived while a function waited for a blob answer, to be read next.
        self.stash = collections.deque()

    def read(self, wait=True):
        """The next frame; None at the end of input; NOTHING if `wait` is false and no whole
        frame has arrived yet."""
        if self.stash:
            return self.stash.popleft()
        return self.read_pipe(wait)

    def answer(self):
        """Waits for the endpoint's `blob` answer, keeping the frames that come before it."""
        while True:
            frame = self.read_pipe(True)
            if frame is None:
                raise EOFError("the endpoint closed the pipe")
            if frame.get("op") == "blob":
                return frame
            self.stash.append(frame)

    def read_raw(self, n, out):
        """Copies the next `n` raw bytes of the pipe into the file `out`."""
        while n > 0:
            if not self.buf:
                chunk = os.read(self.rfd, 1 << 20)
                if not chunk:
                    raise EOFError("the endpoint closed the pipe in the middle of a blob")
                self.buf += chunk
            take = min(n, len(self.buf))
            out.write(self.buf[:take])
            del self.buf[:take]
            n -= take

    def read_pipe(self, wait):
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack_from(">I", self.buf)
                if n > MAX_FRAME:
                    raise ValueError("frame of %d bytes is over the limit" % n)
                if len(self.buf) >= 4 + n:
                    body = bytes(self.buf[4 : 4 + n])
                    del self.buf[: 4 + n]
                    return json.loads(body)
            if self.eof:
                return None
            if not wait and not select.select([self.rfd], [], [], 0)[0]:
                return NOTHING
            chunk = os.read(self.rfd, 1 << 16)
            if not chunk:
                self.eof = True
            self.buf += chunk

    def write(self, obj, raw=None):
        """Writes a frame; `raw` (bytes) follows it unframed: a spilled value."""
        body = dumps(obj).encode()
        self.tx.write(struct.pack(">I", len(body)))
        self.tx.write(body)
        if raw is not None:
            self.tx.write(raw)
        if self.pending == 0:
            self.first_pending = time.monotonic()
        self.pending += 1

    def flush(self):
        if self.pending:
            self.tx.flush()
            self.pending = 0

    def maybe_flush(self, inbox_empty):
        # Results go out in batches while the batch keeps the worker busy, but never later than
        # a millisecond after the first of them, and at once when the worker goes idle.
        if self.pending and (inbox_empty or time.monotonic() - self.first_pending > 0.001):
            self.flush()


class Worker:
    def __init__(self, channel):
        self.ch = channel
        self.functions = {}
        self.broken = {}
        self.cancelled = set()
        self.base_vm = vm_size()
        self.hard_as = None
        # The address-space limit in force (0: none), so that a task without a memory limit
        # costs no setrlimit calls.
        self.mem_limit = 0
        # When `take` last looked at the pipe (time.monotonic()).
        self.polled = 0.0

    def take(self, batch, wait):
        """Takes in the frames that have arrived, waiting for one if `wait`. One thread reads and
        runs: a cancel that arrives while a batch runs is seen before the batch's next task that
        starts more than `POLL_EVERY` after it arrived (a running task is cancelled by the
        endpoint, which stops the worker). False at the end."""
        self.polled = time.monotonic()
        while True:
            frame = self.ch.read(wait)
            if frame is NOTHING:
                return True
            if frame is None:
                return False
            op = frame.get("op")
            if op == "cancel":
                self.cancelled.update(frame.get("ids", []))
            elif op == "run":
                batch.extend(frame.get("tasks", []))
            elif op == "exit":
                return False
            wait = False

    def serve(self):
        self.ch.write(
            {
                "op": "hello",
                "v": VERSION,
                "pid": os.getpid(),
                "python": "%d.%d.%d" % sys.version_info[:3],
                "cloudpickle": HAVE_CLOUDPICKLE,
            }
        )
        self.ch.flush()
        batch = collections.deque()
        ending = False
        while True:
            if not batch:
                self.ch.flush()
                if ending:
                    break
            if not ending and (not batch or time.monotonic() - self.polled >= POLL_EVERY):
                try:
                    ending = not self.take(batch, wait=not batch)
                except Exception as e:  # a broken pipe or a bad frame: stop after this batch
                    print("funcmesh worker: reading the pipe failed: %r" % (e,), file=sys.stderr)
                    ending = True
            if not batch:
                continue
            task = batch.popleft()
            skip = False
            if self.cancelled:
                skip = task.get("id") in self.cancelled
                self.cancelled.discard(task.get("id"))
            if skip:
                self.ch.write({"op": "result", "id": task.get("id"), "ok": False,
                               "error": error("Cancelled", "cancelled before it started"),
                               "run_us": 0})
            else:
                result = self.run(task)
                raw = result.pop("_spilled", None)
                self.ch.write(result, raw)
                if result.get("recycle"):
                    self.ch.flush()
                    break
            self.ch.maybe_flush(not batch)
        self.ch.flush()

    def run(self, task):
        tid = task.get("id")
        CURRENT["id"] = tid
        start = time.perf_counter()
        recycle = False
        try:
            fn = self.function(task)
            if fn[0] == "shell":
                out = run_shell(fn[1], task)
            else:
                args, kwargs = decode_args(task)
                self.limit_memory(task.get("memory_mb") or 0)
                value = fn[1](*args, **kwargs)
                value, size = encode_value(value, task)
                out = {"ok": True, "value": value, "size": size}
        except MemoryError:
            recycle = True  # a worker that ran out of memory may be in any state: replace it
            limit = task.get("memory_mb") or 0
            out = {"ok": False, "error": error(
                "MemoryError",
                "the task exceeded its memory limit of %d MiB" % limit if limit
                else "out of memory",
                remote_traceback())}
        except TaskError as e:
            out = {"ok": False, "error": e.payload}
        except BaseException as e:  # noqa: BLE001 - user code may raise anything
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                recycle = True
            out = {"ok": False, "error": error(type(e).__name__, str(e), remote_traceback())}
        out["op"] = "result"
        out["id"] = tid
        out["run_us"] = int((time.perf_counter() - start) * 1e6)
        if recycle:
            out["recycle"] = True
        limit = task.get("result_limit") or 0
        inline = task.get("inline_limit") or 0
        size = out.pop("size", None)
        if (limit or inline) and out.get("ok"):
            if size is None:
                size = len(dumps(out["value"]))
            if limit and size > limit:
                out = {"op": "result", "id": tid, "ok": False, "run_us": out["run_us"],
                       "error": error("ResultTooLarge",
                                      "the result is %d bytes, over this endpoint's limit of %d "
                                      "bytes: return less, or write large data to a file in "
                                      "the endpoint's data root and return its path"
                                      % (size, limit))}
            elif inline and size > inline:
                # Too large to travel with the task: it follows the frame, raw, into a blob.
                data = dumps(out.pop("value")).encode()
                out["spill"] = len(data)
                out["_spilled"] = data
        return out

    def function(self, task):
        fid = task.get("fid")
        fn = self.functions.get(fid)
        if fn is not None:
            return fn
        broken = self.broken.get(fid)
        if broken is not None:
            # It was sent once and did not load: every task of it fails the same way (the
            # endpoint does not send a function twice to one worker).
            raise broken
        spec = task.get("fn")
        if spec is None:
            raise TaskError("UnknownFunction", "function %s was never sent to this worker" % fid)
        try:
            return self.load(fid, spec)
        except TaskError as e:
            self.broken[fid] = e
            raise

    def load(self, fid, spec):
        form = spec.get("form")
        if form == "python_source":
            name = "<funcmesh function %s>" % fid[:12]
            source = spec["source"]
            linecache.cache[name] = (len(source), None, source.splitlines(True), name)
            namespace = {"__name__": "__funcmesh_function__"}
            try:
                exec(compile(source, name, "exec"), namespace)
            except BaseException as e:  # noqa: BLE001
                raise TaskError(type(e).__name__, "the function's source does not load: %s" % e,
                                remote_traceback())
            entry = spec.get("entrypoint")
            target = namespace.get(entry)
            if not callable(target):
                raise TaskError("UnknownEntrypoint",
                                "the source defines no callable named %r" % (entry,))
            fn = ("python", target)
        elif form == "python_payload":
            if not HAVE_CLOUDPICKLE:
                raise TaskError("CloudpickleMissing",
                                "this function is pickled, and cloudpickle is not installed in "
                                "the worker's environment: install it there "
                                "(pip install cloudpickle)")
            import pickle

            try:
                fn = ("python", pickle.loads(base64.b64decode(spec["payload"])))
            except BaseException as e:  # noqa: BLE001
                raise TaskError(type(e).__name__,
                                "the pickled function does not load here: %s (a function "
                                "from a module the endpoint cannot import must be sent by "
                                "value; and pickles load only between the same Python minor "
                                "version and cloudpickle: this worker runs Python %s with "
                                "cloudpickle %s, as %s)"
                                % (e, "%d.%d.%d" % sys.version_info[:3],
                                   getattr(sys.modules.get("cloudpickle"), "__version__", "?"),
                                   sys.executable), remote_traceback())
        elif form == "shell":
            fn = ("shell", spec["command"])
        else:
            raise TaskError("UnknownForm", "functions of form %r are not supported" % (form,))
        self.functions[fid] = fn
        return fn

    def limit_memory(self, mb):
        """Limits the worker's address space to what it used at start plus `mb` MiB, hard as
        well as soft, so that no task can lift it. The limit is the endpoint's, the same for
        every task, so the worker never needs to raise it; a task whose limit cannot be set is
        not run."""
        if not mb or mb == self.mem_limit:
            return
        if resource is None or self.base_vm is None:
            raise TaskError("MemoryLimitError",
                            "this worker cannot set a memory limit (no resource module, or no "
                            "/proc); the task was not run")
        limit = self.base_vm + (mb << 20)
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ValueError, OSError) as e:
            raise TaskError("MemoryLimitError",
                            "cannot set the memory limit of %d MiB (%s); the task was not run"
                            % (mb, e))
        self.mem_limit = mb


class TaskError(Exception):
    def __init__(self, type_name, message, tb=None):
        super().__init__(message)
        self.payload = error(type_name, message, tb)


# An error's message and traceback are each cut to this many characters (their ends kept), so
# that every failure can be delivered, however much the exception carried.
ERROR_TEXT_CAP = 64 << 10


def clip(text):
    if len(text) <= ERROR_TEXT_CAP:
        return text
    half = ERROR_TEXT_CAP // 2
    return "%s\n[... %d characters cut]\n%s" % (text[:half], len(text) - 2 * half, text[-half:])


def error(type_name, message, tb=None):
    e = {"type": clip(str(type_name)), "message": clip(str(message))}
    if tb:
        e["traceback"] = clip(tb)
    return e


def remote_traceback():
    etype, value, tb = sys.exc_info()
    # Drop the worker's own frames, and those of a wrapper that hides its own (a local
    # `__tracebackhide__ = True`, as pytest has it): the user wants to see their function.
    while tb is not None and (tb.tb_frame.f_code.co_filename == __file__
                              or tb.tb_frame.f_locals.get("__tracebackhide__")):
        tb = tb.tb_next
    return "".join(traceback.format_exception(etype, value, tb))


def vm_size():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def decode_args(task):
    if task.get("encoding") == "pickle":
        if not HAVE_CLOUDPICKLE:
            raise TaskError("CloudpickleMissing",
                            "the arguments are pickled, and cloudpickle is not installed in the "
                            "worker's environment")
        import pickle

        args, kwargs = pickle.loads(base64.b64decode(task["args"]))
        return list(args), dict(kwargs)
    args = task.get("args") or []
    kwargs = task.get("kwargs") or {}
    if not isinstance(args, list):
        raise TaskError("BadArguments", "args must be a JSON array")
    if not isinstance(kwargs, dict):
        raise TaskError("BadArguments", "kwargs must be a JSON object")
    return args, kwargs


def encode_value(value, task):
    """The value as sent, and its size in JSON bytes (checked against the result limit)."""
    if task.get("encoding") == "pickle":
        import cloudpickle

        data = base64.b64encode(cloudpickle.dumps(value)).decode()
        return {"pickle": data}, len(data) + len('{"pickle":""}')
    if value is None or value is True or value is False:
        return value, 5 if value is False else 4
    try:
        # A plain int's JSON is its decimal digits (a huge one raises ValueError, as dumps does).
        size = len(str(value)) if type(value) is int else len(dumps(value))
    except (TypeError, ValueError) as e:
        raise TaskError("UnserialisableResult",
                        "the function returned a %s, which is not JSON: return JSON types "
                        "(dict, list, str, number, bool, None), or submit through the Python SDK, "
                        "which pickles (%s)" % (type(value).__name__, e))
    return value, size


def cap(data, limit, dropped=0):
    """The last `limit` characters of `data` (`dropped`: bytes already cut before it)."""
    text = data.decode("utf-8", "replace")
    if limit and (len(text) > limit or dropped):
        cut = max(len(text) - limit, 0) + dropped
        text = "[... %d characters cut]\n" % cut + text[-limit:]
    return text


# What a command may write to one stream is kept in memory up to this many bytes when the
# endpoint sets no output cap.
UNCAPPED_OUTPUT = 16 << 20


def drain(proc, timeout, limit):
    """Reads a command's stdout and stderr as they come, keeping only the last bytes of each that
    the cap can show (a command that writes without end does not grow the worker), until both
    close; kills the command's process group at `timeout`. Returns ((out, cut), (err, cut),
    timed_out), `cut` being the bytes dropped from the front."""
    keep = limit * 4 if limit else UNCAPPED_OUTPUT  # a character is at most 4 bytes
    fds = [proc.stdout.fileno(), proc.stderr.fileno()]
    bufs = {fd: bytearray() for fd in fds}
    cut = {fd: 0 for fd in fds}
    live = set(fds)
    deadline = time.monotonic() + timeout if timeout else None
    timed_out = False
    while live:
        wait = None
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0:
                if timed_out:
                    break  # what the killed group left open is abandoned
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                deadline = time.monotonic() + 2.0
                continue
        ready, _, _ = select.select(list(live), [], [], wait)
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                live.discard(fd)
                continue
            buf = bufs[fd]
            buf += chunk
            if len(buf) > keep:
                over = len(buf) - keep
                del buf[:over]
                cut[fd] += over
    proc.stdout.close()
    proc.stderr.close()
    proc.wait()
    out, err = fds
    return (bytes(bufs[out]), cut[out]), (bytes(bufs[err]), cut[err]), timed_out


def run_shell(template, task):
    args = task.get("args") or []
    kwargs = task.get("kwargs") or {}
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise TaskError("BadArguments", "args must be a JSON array and kwargs a JSON object")

    def quote(v):
        return shlex.quote(v if isinstance(v, str) else json.dumps(v))

    try:
        cmd = template.format(*[quote(a) for a in args], **{k: quote(v) for k, v in kwargs.items()})
    except (KeyError, IndexError) as e:
        raise TaskError("BadArguments",
                        "the command template %r needs the argument %s: pass it with --kwargs"
                        % (template, e))
    timeout = (task.get("timeout_ms") or 0) / 1000.0 or None
    mb = task.get("memory_mb") or 0

    def limits():
        # A group of its own (a timeout kills the whole command), in the worker's session (the
        # endpoint kills the session's leftovers when the worker ends).
        os.setpgrp()
        if mb and resource is not None:
            base = vm_size() or 0
            # Hard as well as soft: the command cannot raise its own limit.
            limit = base + (mb << 20)
            # Never above the worker's own hard limit (a Python task may have set it).
            hard = resource.getrlimit(resource.RLIMIT_AS)[1]
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.Popen(cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=limits)
    limit = task.get("output_cap") or 0
    (out, out_cut), (err, err_cut), timed_out = drain(proc, timeout, limit)
    # As coreutils timeout(1) and Globus Compute's ShellFunction.
    code = 124 if timed_out else proc.returncode
    value = {"returncode": code, "stdout": cap(out, limit, out_cut),
             "stderr": cap(err, limit, err_cut), "cmd": cmd}
    if code != 0:
        what = ("timed out after %gs" % timeout) if code == 124 and timeout else (
            "exited with %d" % code)
        e = error("CommandFailed" if code != 124 else "Timeout", "the command %s" % what)
        e["value"] = value
        return {"ok": False, "error": e}
    return {"ok": True, "value": value}


# The running task's id, for the blob helpers.
CURRENT = {"id": None, "channel": None}


def blob_put(path):
    """Stores the file at `path` in the endpoint node's blob store; returns its reference,
    {"blake3": ..., "size": ..., "node": <the endpoint node's peer id>}: return it, and the
    submitter fetches the blob with `funcmesh transfer get HASH --from NODE`."""
    ch = CURRENT["channel"]
    if ch is None or CURRENT["id"] is None:
        raise RuntimeError("funcmesh_blobs.put works inside a task only")
    size = os.path.getsize(path)
    ch.write({"op": "put", "id": CURRENT["id"], "spill": size})
    with open(path, "rb") as f:
        left = size
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                raise RuntimeError("%s shrank while it was being stored" % path)
            ch.tx.write(chunk)
            left -= len(chunk)
    ch.flush()
    reply = ch.answer()
    if reply.get("error"):
        raise RuntimeError(reply["error"])
    ref = dict(reply["ref"])
    if reply.get("node"):
        ref["node"] = reply["node"]
    return ref


def blob_get(ref, path=None):
    """Fetches the blob `ref` ({"blake3", "size"}, as `put` or `funcmesh transfer put` gave it)
    from the member it names (`node`, as `put` sets it) or else the task's submitter, unless the
    endpoint's node holds it, into a file: `path`, or a new file in the working directory.
    Returns the file's path."""
    ch = CURRENT["channel"]
    if ch is None or CURRENT["id"] is None:
        raise RuntimeError("funcmesh_blobs.get works inside a task only")
    want = {"blake3": str(ref["blake3"]), "size": int(ref["size"])}
    ask = {"op": "get", "id": CURRENT["id"], "ref": want}
    if ref.get("node"):
        ask["from"] = str(ref["node"])
    ch.write(ask)
    ch.flush()
    reply = ch.answer()
    if reply.get("error"):
        raise RuntimeError(reply["error"])
    if path is None:
        import tempfile

        fd, path = tempfile.mkstemp(prefix="blob-%s-" % want["blake3"][:12], dir=os.getcwd())
        os.close(fd)
    with open(path, "wb") as out:
        ch.read_raw(int(reply["size"]), out)
    return path


def install_blob_helpers(channel):
    import types

    module = types.ModuleType("funcmesh_blobs")
    module.__doc__ = "Blobs for funcmesh functions: put(path) -> ref, get(ref) -> path."
    module.put = blob_put
    module.get = blob_get
    sys.modules["funcmesh_blobs"] = module
    CURRENT["channel"] = channel


def main():
    channel = Channel()
    install_blob_helpers(channel)
    Worker(channel).serve()


if __name__ == "__main__":
    main()
