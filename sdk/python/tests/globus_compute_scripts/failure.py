"""A Globus Compute script, unmodified: a function that raises, and what the caller sees."""

import json
import os
import time

from globus_compute_sdk import Client
from globus_compute_sdk.errors import TaskExecutionFailed, TaskPending

ENDPOINT_ID = os.environ["ENDPOINT_ID"]


def check_sample(name):
    raise ValueError("sample %s is contaminated" % name)


gcc = Client()
task_id = gcc.run("A7", endpoint_id=ENDPOINT_ID, function_id=gcc.register_function(check_sample))
deadline = time.time() + 120
while True:
    try:
        gcc.get_result(task_id)
        raise SystemExit("the task did not fail")
    except TaskPending:
        assert time.time() < deadline
        time.sleep(0.2)
    except TaskExecutionFailed as e:
        print(json.dumps({"type": type(e).__name__, "text": str(e)}))
        break
