"""The real globus-compute-sdk, from PyPI, in a virtualenv of its own, driving a funcmesh node
through its Globus Compute API: each script in globus_compute_scripts/ is an ordinary Globus
Compute script, run unmodified with only the environment `funcmesh compat env` prints."""

import json
import os
import subprocess

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "globus_compute_scripts")


def run_script(gc, name, timeout=300):
    python, node = gc
    out = subprocess.run([python, os.path.join(SCRIPTS, name)], env=node.env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, "%s failed:\n%s\n%s" % (name, out.stdout, out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_client_registers_runs_and_fetches_results_one_by_one_and_in_a_batch(gc):
    r = run_script(gc, "client_basics.py")
    assert r["status"] == "online"
    assert r["one"] == 5
    assert r["batch"] == [i + 100 for i in range(10)]
    # funcmesh's ids, as the SDK's UUIDs: the function is in the node's registry.
    _, node = gc
    out = subprocess.run([node.binary, "function", "show", r["function_id"].replace("-", ""),
                          "--node", node.a1, "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["name"] == "add"


def test_a_failing_function_raises_task_execution_failed_with_the_remote_traceback(gc):
    r = run_script(gc, "failure.py")
    assert r["type"] == "TaskExecutionFailed"
    assert "ValueError: sample A7 is contaminated" in r["text"], r["text"]
    # The traceback reaches into the user's function, by name and line.
    assert "in check_sample" in r["text"], r["text"]
    assert 'raise ValueError("sample %s is contaminated" % name)' in r["text"], r["text"]
    # ... and starts there: nothing of funcmesh's wrapper or worker shows.
    assert "globus_compute_task" not in r["text"] and "worker.py" not in r["text"], r["text"]


def test_the_executor_gets_results_through_rabbitmq(gc):
    r = run_script(gc, "executor.py")
    assert r["one"] == 144
    assert r["squares"] == [i * i for i in range(200)]
    assert r["map"] == [i * i for i in range(50)]
    assert "ZeroDivisionError" in r["error"], r["error"]
