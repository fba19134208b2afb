"""A client of one funcmesh node's HTTP API (standard library only, plus cloudpickle)."""

import base64
import hashlib
import http.client
import json
import os
import sys
import sysconfig
import threading
import urllib.parse

import cloudpickle


class FuncmeshError(Exception):
    """The node refused a request; the message says why and what to do."""


class RemoteError(Exception):
    """A task failed on its endpoint. ``type_name``, ``remote_message`` and ``traceback`` are
    the remote exception's; the message carries all three."""

    def __init__(self, task_id, error):
        self.task_id = task_id
        self.kind = error.get("kind", "")
        self.type_name = error.get("type", "Exception")
        self.remote_message = error.get("message", "")
        self.traceback = error.get("traceback") or ""
        text = "%s: %s" % (self.type_name, self.remote_message)
        if self.traceback:
            text += "\n\nRemote traceback (task %s):\n%s" % (task_id, self.traceback)
        super().__init__(text)


def _find_node(node):
    """The node's data dir: the argument, else $FUNCMESH_NODE."""
    node = node or os.environ.get("FUNCMESH_NODE")
    if not node:
        raise FuncmeshError(
            "no node given: pass node='DATA_DIR' (or url= and token=), or set FUNCMESH_NODE "
            "to a running node's data dir")
    path = os.path.join(node, "api.json")
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise FuncmeshError(
            "%s has no api.json: is a node running there? (funcmesh start --data-dir %s)"
            % (node, node)) from None
    return info["url"], info["token"]


def _installed(module):
    """Whether `module` comes with Python or an installed package (an endpoint can import it
    too), rather than from the user's own files."""
    path = getattr(module, "__file__", None)
    if not path:
        return True
    path = os.path.realpath(path)
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return any(path.startswith(os.path.realpath(r) + os.sep) for r in roots if r)


def _dumps_by_value(function):
    """cloudpickle of `function`, with the user's own module sent by value: an endpoint has
    the installed packages, not the user's scripts, notebooks and test files."""
    module = sys.modules.get(getattr(function, "__module__", None) or "")
    by_value = module is not None and module.__name__ != "__main__" and not _installed(module)
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(function)
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)


class Client:
    """One node's API. ``Client(node="DATA_DIR")``, ``Client()`` with $FUNCMESH_NODE, or
    ``Client(url=..., token=...)``."""

    def __init__(self, node=None, url=None, token=None, timeout=60.0):
        if url is None:
            url, token = _find_node(node)
        parsed = urllib.parse.urlparse(url)
        self._host = parsed.hostname
        self._port = parsed.port or 80
        self._token = token
        self._timeout = timeout
        self._local = threading.local()
        self._registered = {}

    # --- HTTP -------------------------------------------------------------------------------

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            self._local.conn = conn
        return conn

    def _call(self, method, path, body=None, timeout=None):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": "Bearer " + self._token}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            conn = self._conn()
            if timeout is not None:
                conn.timeout = timeout
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (http.client.HTTPException, ConnectionError, OSError):
                # A kept-alive connection the node closed: once more on a new one.
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        return self._answer(resp.status, raw, method, path)

    # --- functions --------------------------------------------------------------------------

    def register_function(self, function, name=None):
        """Registers ``function`` (a callable, sent by value with cloudpickle) and returns its
        id. The same function object is registered once per client."""
        key = id(function)
        cached = self._registered.get(key)
        if cached is not None and cached[0] is function:
            return cached[1]
        payload = base64.b64encode(_dumps_by_value(function)).decode()
        if name is None:
            base = getattr(function, "__name__", "function")
            if base == "<lambda>":
                base = "lambda"
            digest = hashlib.sha256(payload.encode()).hexdigest()[:8]
            name = "%s-%s" % (base, digest)
        written = self._call("POST", "/v1/functions", {"name": name, "payload": payload})
        fid = written.get("id") or written.get("function_id") or name
        self._registered[key] = (function, fid)
        return fid

    def register_source(self, source, entrypoint, name=None, description=""):
        """Registers Python source text whose function ``entrypoint`` is called (no pickling:
        any Python on an endpoint runs it); returns its id."""
        written = self._call("POST", "/v1/functions", {
            "name": name or entrypoint, "python": source, "entrypoint": entrypoint,
            "description": description})
        return written["id"]

    def functions(self):
        return self._call("GET", "/v1/functions")

    def endpoints(self):
        return self._call("GET", "/v1/endpoints")

    # --- tasks ------------------------------------------------------------------------------

    @staticmethod
    def task(function_id, args=(), kwargs=None, endpoint=None, institution=None,
             retries=0, timeout=None, requirements=None):
        """One task's submission body (for :meth:`submit_batch`). ``requirements`` are tags the
        endpoint must have (``{"gpu": "a100"}``)."""
        body = {
            "function": function_id,
            "args": base64.b64encode(cloudpickle.dumps((tuple(args), dict(kwargs or {})))).decode(),
            "encoding": "pickle",
            "retries": retries,
        }
        if endpoint:
            body["endpoint"] = endpoint
        if institution:
            body["institution"] = institution
        if timeout:
            body["timeout_ms"] = int(timeout * 1000)
        if requirements:
            body["require"] = {str(k): str(v) for k, v in requirements.items()}
        return body

    def submit_batch(self, tasks):
        """Submits task bodies at once; returns their ids (raises on the first refusal)."""
        listed = self._call("POST", "/v1/tasks", {"tasks": list(tasks)})
        ids = []
        for t in listed["tasks"]:
            if t.get("task") is None:
                raise FuncmeshError(t.get("error", "the task was refused"))
            ids.append(t["task"]["id"])
        return ids

    def run(self, function, *args, endpoint=None, **kwargs):
        """Submits ``function(*args, **kwargs)``; returns the task id."""
        fid = function if isinstance(function, str) else self.register_function(function)
        return self.submit_batch([self.task(fid, args, kwargs, endpoint=endpoint)])[0]

    def status(self, task_id):
        return self._call("GET", "/v1/tasks/" + task_id)

    def wait(self, task_ids, timeout=0.0):
        """The tasks' views once all finished, or as they are after ``timeout`` seconds."""
        listed = self._call("POST", "/v1/tasks/wait",
                            {"ids": list(task_ids), "timeout_ms": int(timeout * 1000)},
                            timeout=timeout + 30)
        return [t.get("task") for t in listed["tasks"]]

    def batch_status(self, task_ids):
        """The tasks' views as they are now (``None`` for an id this node did not submit)."""
        return self.wait(task_ids, 0.0)

    def result(self, task_id, timeout=600.0):
        """The task's value (raises ``RemoteError`` if it failed, ``TimeoutError`` if it did
        not finish in time)."""
        view = self.wait([task_id], timeout)[0]
        return self.outcome(view)

    def cancel(self, task_id):
        return self._call("POST", "/v1/tasks/%s/cancel" % task_id)

    @staticmethod
    def finished(view):
        return view is not None and view.get("status") in ("succeeded", "failed", "cancelled")

    def value(self, task_id):
        """A succeeded task's value as JSON, fetched from the node (for values that went by
        reference: the node fetches them from the endpoint's node over the data plane)."""
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            conn.request("GET", "/v1/tasks/%s/value" % task_id,
                         headers={"Authorization": "Bearer " + self._token})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise FuncmeshError("GET /v1/tasks/%s/value: %s (HTTP %d)"
                                % (task_id, raw.decode(errors="replace"), resp.status))
        return json.loads(raw)

    def outcome(self, view):
        """A finished task's value, or its failure raised."""
        if not Client.finished(view):
            raise TimeoutError("task %s has not finished" % (view or {}).get("id"))
        out = view.get("outcome") or {}
        if view["status"] == "succeeded":
            value = out.get("value")
            if out.get("value_ref") is not None:
                # Too large to travel with the task: fetched by reference.
                value = self.value(view["id"])
            if isinstance(value, dict) and "pickle" in value:
                return cloudpickle.loads(base64.b64decode(value["pickle"]))
            return value
        if view["status"] == "cancelled":
            raise FuncmeshError("task %s was cancelled" % view["id"])
        raise RemoteError(view["id"], out.get("error") or {})

    # --- transfers --------------------------------------------------------------------------

    def copy(self, source, destination, recursive=False, sync=None, delete=False,
             request_id=None, wait=True, timeout=3600.0, progress=None):
        """Copies ``ENDPOINT:PATH`` to ``ENDPOINT:PATH`` (the destination an endpoint of this
        node), verified. With ``wait``, returns the finished job (``progress(job)`` is called
        as it goes) and raises ``FuncmeshError`` if it failed; else returns it accepted."""
        body = {"source": source, "destination": destination, "recursive": recursive,
                "delete": delete}
        if sync:
            body["sync"] = sync
        if request_id:
            body["request_id"] = request_id
        job = self._call("POST", "/v1/transfers", body, timeout=120)
        if not wait:
            return job
        import time

        deadline = time.time() + timeout
        while job["state"] == "active":
            if time.time() > deadline:
                raise TimeoutError("transfer %s still runs after %s s" % (job["id"], timeout))
            if progress is not None:
                progress(job)
            time.sleep(0.1)
            job = self.transfer(job["id"])
        if progress is not None:
            progress(job)
        if job["state"] != "succeeded":
            raise FuncmeshError("transfer %s %s: %s" % (job["id"], job["state"],
                                                        job.get("error") or job.get("errors")))
        return job

    def put(self, path, progress=None):
        """Stores the file at ``path`` as a blob on the node (streamed, any size); returns
        ``{"hash", "size"}``: the BLAKE3 hash any member can fetch it by. ``progress(done,
        total)`` is called as it goes."""
        import os

        total = os.path.getsize(path)
        conn = http.client.HTTPConnection(self._host, self._port, timeout=3600)
        try:
            conn.putrequest("POST", "/v1/blobs")
            conn.putheader("Authorization", "Bearer " + self._token)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(total))
            conn.endheaders()
            done = 0
            with open(path, "rb") as f:
                while True:
                    chunk = f.read(1 << 20)
                    if not chunk:
                        break
                    conn.send(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            resp = conn.getresponse()
            return self._answer(resp.status, resp.read(), "POST", "/v1/blobs")
        finally:
            conn.close()

    def get(self, blob_hash, out, source=None, progress=None):
        """Writes blob ``blob_hash`` to the file ``out``, fetched (and verified) from the member
        ``source`` (a peer id) if the node does not hold it; returns the bytes written.
        ``progress(done, total)`` is called as it goes."""
        path = "/v1/blobs/" + urllib.parse.quote(blob_hash, safe="")
        if source:
            path += "?from=" + urllib.parse.quote(source, safe="")
        conn = http.client.HTTPConnection(self._host, self._port, timeout=3600)
        try:
            conn.request("GET", path, headers={"Authorization": "Bearer " + self._token})
            resp = conn.getresponse()
            if resp.status >= 300:
                self._answer(resp.status, resp.read(), "GET", path)
            total = int(resp.getheader("Content-Length") or 0)
            done = 0
            with open(out, "wb") as f:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            return done
        finally:
            conn.close()

    @staticmethod
    def _answer(status, raw, method, path):
        """The JSON of an answer's body, or ``FuncmeshError`` with the node's message."""
        text = raw.decode() if raw else ""
        if status >= 300:
            try:
                message = json.loads(text).get("error", text)
            except ValueError:
                message = text
            raise FuncmeshError("%s %s: %s (HTTP %d)" % (method, path, message, status))
        return json.loads(text) if text else None

    def transfer(self, job_id):
        return self._call("GET", "/v1/transfers/" + urllib.parse.quote(job_id, safe=""))

    def ls(self, path):
        """The entries of ``ENDPOINT:PATH``."""
        return self._call("GET", "/v1/transfers/ls?path=" + urllib.parse.quote(path, safe=""))

    # --- flows ------------------------------------------------------------------------------

    def deploy_flow(self, definition, title, **fields):
        """Deploys a flow definition (Globus Flows dialect); returns the deployed flow."""
        body = dict(fields, definition=definition, title=title)
        return self._call("POST", "/v1/flows", body)

    def start_run(self, flow=None, definition=None, input=None, label=None, run_id=None):
        """Starts a run of a deployed flow (its id) or of a definition; returns the run."""
        body = {"input": input or {}}
        if flow is not None:
            body["flow_id"] = flow
        if definition is not None:
            body["definition"] = definition
        if label:
            body["label"] = label
        if run_id:
            body["run_id"] = run_id
        return self._call("POST", "/v1/runs", body)

    def run_status(self, run_id):
        return self._call("GET", "/v1/runs/" + urllib.parse.quote(run_id, safe=""))

    def run_log(self, run_id):
        return self._call("GET", "/v1/runs/%s/log" % urllib.parse.quote(run_id, safe=""))

    def watch_run(self, run_id, timeout=3600.0, interval=0.2):
        """Waits until the run ends (SUCCEEDED, FAILED or ENDED) or waits INACTIVE for a
        right; returns it."""
        import time

        deadline = time.time() + timeout
        while True:
            run = self.run_status(run_id)
            if run["status"] in ("SUCCEEDED", "FAILED", "ENDED", "INACTIVE"):
                return run
            if time.time() > deadline:
                raise TimeoutError("run %s still %s after %s s" % (run_id, run["status"], timeout))
            time.sleep(interval)

    def events(self):
        """Finished tasks, as the node pushes them (``/v1/tasks/events``): returns once
        subscribed an iterator of task views (None when the stream lagged: ask for the tasks
        waited on)."""
        conn = http.client.HTTPConnection(self._host, self._port, timeout=None)
        conn.request("GET", "/v1/tasks/events",
                     headers={"Authorization": "Bearer " + self._token,
                              "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            conn.close()
            raise FuncmeshError("GET /v1/tasks/events: HTTP %d" % resp.status)
        return self._stream(conn, resp)

    @staticmethod
    def _stream(conn, resp):
        event, data = "", []
        try:
            while True:
                line = resp.readline()
                if not line:
                    return
                line = line.decode().rstrip("\r\n")
                if not line:
                    if event == "task" and data:
                        yield json.loads("".join(data))
                    elif event == "lagged":
                        yield None
                    event, data = "", []
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
        finally:
            conn.close()
