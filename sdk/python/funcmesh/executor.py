"""``Executor``: a ``concurrent.futures.Executor`` whose calls run on funcmesh endpoints."""

import concurrent.futures
import itertools
import queue
import threading
import time

from .client import Client


class Executor(concurrent.futures.Executor):
    """Runs calls on the federation through one node.

    ``endpoint`` / ``institution`` pin where tasks run (default: wherever routing sends them);
    ``requirements`` are tags the endpoint must have (``{"gpu": "a100"}``); ``retries`` retries
    a task elsewhere if its endpoint is lost; ``timeout`` (seconds) limits each task's run.
    Futures resolve as the node pushes finished tasks; ``map`` submits in batches of
    ``batch_size``.
    """

    def __init__(self, endpoint=None, requirements=None, node=None, url=None, token=None,
                 institution=None, retries=0, timeout=None, batch_size=256, client=None):
        self._client = client or Client(node=node, url=url, token=token)
        self._route = {"endpoint": endpoint, "institution": institution, "retries": retries,
                       "timeout": timeout, "requirements": requirements}
        self._batch_size = max(1, batch_size)
        self._futures = {}
        self._lock = threading.Lock()
        self._shutdown = False
        self._listening = threading.Event()
        self._submitters = []
        self._stop_submitting = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="funcmesh-results",
                                         daemon=True)
        self._watcher.start()
        self._listening.wait(10)

    # --- results ----------------------------------------------------------------------------

    def _watch(self):
        """Resolves futures from the node's pushed events; after (re)connecting or a lag, asks
        for what it waits on, so that nothing pushed meanwhile is missed."""
        while not self._shutdown:
            try:
                events = self._client.events()
                self._listening.set()
                self._catch_up()
                for view in events:
                    if view is None:
                        self._catch_up()
                        continue
                    self._resolve(view)
                    if self._shutdown and self._idle():
                        return
            except Exception:  # noqa: BLE001 - the node restarting: connect again
                if self._shutdown:
                    return
                threading.Event().wait(0.5)
                self._catch_up()

    def _idle(self):
        """No future open and no map still sending batches (whose futures are still to come;
        a map's thread lists its futures before it ends, so both are read at once)."""
        with self._lock:
            self._submitters = [t for t in self._submitters if t.is_alive()]
            return not self._futures and not self._submitters

    def _catch_up(self, ids=None):
        """Asks the node about ``ids`` (default: every open future) and resolves the finished."""
        if ids is None:
            with self._lock:
                ids = list(self._futures)
        if not ids:
            return
        try:
            views = self._client.wait(ids, 0)
        except Exception:  # noqa: BLE001 - tried again at the next event
            return
        for view in views:
            if self._client.finished(view):
                self._resolve(view)

    def _resolve(self, view):
        with self._lock:
            future = self._futures.pop(view.get("id"), None)
        if future is None or future.done():
            return
        try:
            future.set_result(self._client.outcome(view))
        except Exception as e:  # noqa: BLE001 - the remote failure is the future's
            future.set_exception(e)

    # --- submitting -------------------------------------------------------------------------

    def _submit_many(self, fn, calls, ours=False):
        if self._shutdown and not ours:
            raise RuntimeError("cannot submit after shutdown")
        fid = self._client.register_function(fn)
        bodies = [self._client.task(fid, args, kwargs, **self._route) for args, kwargs in calls]
        futures = [concurrent.futures.Future() for _ in bodies]
        for f in futures:
            f.set_running_or_notify_cancel()
        ids = self._client.submit_batch(bodies)
        with self._lock:
            for task_id, f in zip(ids, futures):
                f.task_id = task_id
                self._futures[task_id] = f
        # Finished before we listed them: the push went by unheard. Only this batch's: the
        # earlier ones were listed before their pushes could be missed.
        self._catch_up(ids)
        return futures

    def submit(self, fn, /, *args, **kwargs):
        return self._submit_many(fn, [(args, kwargs)])[0]

    def map(self, fn, *iterables, timeout=None, chunksize=None):
        """Like ``Executor.map``: results in order, ``timeout`` counted from this call. Tasks go
        out ``batch_size`` at a time (or ``chunksize``): the first batch before this returns
        (so that a function that cannot be sent fails here), the rest from a thread while the
        results come back, so the first result does not wait for the last submission."""
        deadline = None if timeout is None else time.monotonic() + timeout
        size = chunksize or self._batch_size
        calls = ((args, {}) for args in zip(*iterables))
        first = list(itertools.islice(calls, size))
        if not first:
            return iter(())
        batches = queue.Queue()
        batches.put(self._submit_many(fn, first))

        def submit_rest():
            try:
                while not self._stop_submitting.is_set():
                    batch = list(itertools.islice(calls, size))
                    if not batch:
                        break
                    batches.put(self._submit_many(fn, batch, ours=True))
            except BaseException as e:  # noqa: BLE001 - raised where the results are read
                batches.put(e)
            batches.put(None)

        submitter = threading.Thread(target=submit_rest, name="funcmesh-map", daemon=True)
        with self._lock:
            self._submitters.append(submitter)
        submitter.start()

        def results():
            while True:
                item = batches.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                for f in item:
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    yield f.result(timeout=left)

        return results()

    def shutdown(self, wait=True, *, cancel_futures=False):
        self._shutdown = True
        if cancel_futures:
            self._stop_submitting.set()
        if wait:
            # A map still sending its batches finishes sending them first.
            with self._lock:
                submitters = list(self._submitters)
            for t in submitters:
                t.join()
        if cancel_futures:
            with self._lock:
                pending = list(self._futures.items())
            for task_id, f in pending:
                try:
                    self._client.cancel(task_id)
                except Exception:  # noqa: BLE001 - it may have finished meanwhile
                    pass
                if not f.done():
                    f.set_exception(concurrent.futures.CancelledError())
        if wait:
            with self._lock:
                pending = list(self._futures.values())
            concurrent.futures.wait(pending)
