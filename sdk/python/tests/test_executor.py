"""The Executor and Client against a real node: functions by value, futures pushed by the node."""

import concurrent.futures
import os
import threading

import pytest

import funcmesh


def square(x):
    return x * x


def fail(x):
    raise ValueError("no good: %r" % (x,))


def test_a_plain_function_runs_and_its_result_comes_back(node):
    with funcmesh.Executor(node=node) as ex:
        assert ex.submit(square, 7).result(timeout=60) == 49


def test_lambdas_and_closures_travel_by_value(node):
    k = 10

    def add_k(x):
        return x + k

    with funcmesh.Executor(node=node) as ex:
        assert ex.submit(lambda x, y=2: x * y, 21).result(timeout=60) == 42
        assert ex.submit(add_k, 5).result(timeout=60) == 15


def test_map_keeps_order_across_batches(node):
    with funcmesh.Executor(node=node, batch_size=16) as ex:
        assert list(ex.map(square, range(100), timeout=120)) == [x * x for x in range(100)]


def test_a_remote_exception_is_raised_with_its_traceback(node):
    with funcmesh.Executor(node=node) as ex:
        future = ex.submit(fail, 3)
        with pytest.raises(funcmesh.RemoteError) as caught:
            future.result(timeout=60)
    err = caught.value
    assert err.type_name == "ValueError"
    assert "no good: 3" in str(err)
    assert "fail" in err.traceback, err.traceback


def test_the_client_runs_and_waits(node):
    client = funcmesh.Client(node=node)
    task = client.run(square, 12)
    assert client.result(task, timeout=60) == 144
    assert client.status(task)["status"] == "succeeded"


def test_futures_complete_as_the_node_pushes_them(node):
    with funcmesh.Executor(node=node) as ex:
        futures = [ex.submit(square, i) for i in range(20)]
        done, not_done = concurrent.futures.wait(futures, timeout=120)
        assert not not_done
        assert sorted(f.result() for f in done) == sorted(i * i for i in range(20))


def test_a_missing_node_says_what_to_do(tmp_path):
    with pytest.raises(funcmesh.FuncmeshError) as caught:
        funcmesh.Client(node=str(tmp_path))
    assert "api.json" in str(caught.value)


def test_a_function_the_endpoint_cannot_load_fails_every_task_with_the_reason(node, tmp_path,
                                                                             monkeypatch):
    import base64

    import cloudpickle

    (tmp_path / "only_here.py").write_text("def f(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_here

    client = funcmesh.Client(node=node)
    # Pickled by reference, as cloudpickle does for a module it thinks importable everywhere.
    payload = base64.b64encode(cloudpickle.dumps(only_here.f)).decode()
    client._call("POST", "/v1/functions", {"name": "only-here", "payload": payload})
    for _ in range(2):
        task = client.submit_batch([client.task("only-here", (1,))])[0]
        with pytest.raises(funcmesh.RemoteError) as caught:
            client.result(task, timeout=60)
        assert caught.value.type_name == "ModuleNotFoundError", str(caught.value)
        assert "does not load here" in str(caught.value)


def big(n):
    return b"x" * n


def nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


def test_a_50_mib_result_comes_back_by_reference(node):
    with funcmesh.Executor(node=node) as ex:
        value = ex.submit(big, 50 << 20).result(timeout=120)
    assert len(value) == 50 << 20 and value[:4] == b"xxxx"


def test_a_task_over_its_time_limit_fails_with_timeout(node):
    client = funcmesh.Client(node=node)
    fid = client.register_function(nap)
    task = client.submit_batch([client.task(fid, (30,), timeout=1)])[0]
    with pytest.raises(funcmesh.RemoteError) as caught:
        client.result(task, timeout=60)
    assert caught.value.kind == "timeout", (caught.value.kind, str(caught.value))


def test_a_cancelled_task_ends_cancelled(node):
    client = funcmesh.Client(node=node)
    task = client.run(nap, 30)
    client.cancel(task)
    view = client.wait([task], 60)[0]
    assert view["status"] == "cancelled", view
    with pytest.raises(funcmesh.FuncmeshError):
        client.outcome(view)


def test_waiting_on_a_running_task_times_out_locally(node):
    with funcmesh.Executor(node=node, retries=0) as ex:
        future = ex.submit(nap, 5)
        with pytest.raises(concurrent.futures.TimeoutError):
            future.result(timeout=0.5)
        assert future.result(timeout=60) == 5


def test_a_copy_between_endpoint_data_roots_is_verified_and_reports_progress(node):
    import os

    data = os.path.join(node, "data")
    os.makedirs(os.path.join(data, "in"), exist_ok=True)
    payload = os.urandom(3 << 20)
    with open(os.path.join(data, "in", "sample.bin"), "wb") as f:
        f.write(payload)
    client = funcmesh.Client(node=node)
    seen = []
    job = client.copy("a1:in", "a1:out", recursive=True, progress=seen.append)
    assert job["state"] == "succeeded"
    assert job["progress"]["files_done"] == 1
    assert seen and seen[-1]["state"] == "succeeded"
    with open(os.path.join(data, "out", "sample.bin"), "rb") as f:
        assert f.read() == payload
    listed = client.ls("a1:out")
    assert [os.path.basename(e["path"]) for e in listed] == ["sample.bin"], listed
    assert listed[0]["size"] == len(payload)


def test_a_flow_runs_from_python(node):
    client = funcmesh.Client(node=node)
    definition = {
        "StartAt": "Double",
        "States": {
            "Double": {"Type": "ExpressionEval", "Parameters": {"doubled.=": "x * 2"},
                       "ResultPath": "$.out", "End": True},
        },
    }
    run = client.start_run(definition=definition, input={"x": 21})
    done = client.watch_run(run["run_id"], timeout=60)
    assert done["status"] == "SUCCEEDED", done
    assert done["details"]["output"]["out"]["doubled"] == 42


def test_a_file_put_as_a_blob_comes_back_by_its_hash(node, tmp_path):
    client = funcmesh.Client(node=node)
    data = os.urandom(3 << 20) + b"end"
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    seen = []
    ref = client.put(str(src), progress=lambda done, total: seen.append((done, total)))
    assert ref["size"] == len(data)
    assert len(ref["hash"]) == 64
    assert seen[-1] == (len(data), len(data))
    out = tmp_path / "out.bin"
    assert client.get(ref["hash"], str(out)) == len(data)
    assert out.read_bytes() == data
    with pytest.raises(funcmesh.FuncmeshError) as caught:
        client.get("0" * 64, str(tmp_path / "none"))
    assert "HTTP 404" in str(caught.value)


def test_source_text_registers_and_batches_report_their_status(node):
    client = funcmesh.Client(node=node)
    fid = client.register_source("def triple(x):\n    return 3 * x\n", "triple")
    assert any(f["id"] == fid and f["name"] == "triple" for f in client.functions())
    ids = client.submit_batch([client.task(fid, (i,)) for i in range(5)])
    views = client.wait(ids, timeout=60)
    assert [client.outcome(v) for v in views] == [0, 3, 6, 9, 12]
    now = client.batch_status(ids + ["0" * 32])
    assert [v["status"] for v in now[:5]] == ["succeeded"] * 5
    assert now[5] is None


def test_map_yields_its_first_results_while_it_still_submits(node):
    with funcmesh.Executor(node=node, batch_size=50) as ex:
        results = ex.map(square, range(1000))
        assert next(results) == 0
        assert list(results) == [x * x for x in range(1, 1000)]
        # A map whose first batch cannot be sent (a lock does not pickle) fails at the call.
        with pytest.raises(TypeError):
            ex.map(square, [threading.Lock()])


def test_shutdown_waits_for_a_map_that_is_still_submitting(node):
    ex = funcmesh.Executor(node=node, batch_size=25)
    results = ex.map(square, range(500))
    ex.shutdown(wait=True)
    assert list(results) == [x * x for x in range(500)]
