"""A Globus Compute script, unmodified: register, run, fetch results one by one and in a batch."""

import json
import os
import time

from globus_compute_sdk import Client
from globus_compute_sdk.errors import TaskPending

ENDPOINT_ID = os.environ["ENDPOINT_ID"]


def add(a, b=0):
    return a + b


def wait(gcc, task_id, timeout=120):
    deadline = time.time() + timeout
    while True:
        try:
            return gcc.get_result(task_id)
        except TaskPending:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


gcc = Client()
status = gcc.get_endpoint_status(ENDPOINT_ID)
func_id = gcc.register_function(add)
task_id = gcc.run(2, endpoint_id=ENDPOINT_ID, function_id=func_id, b=3)
one = wait(gcc, task_id)

batch = gcc.create_batch()
for i in range(10):
    batch.add(func_id, args=(i,), kwargs={"b": 100})
submitted = gcc.batch_run(ENDPOINT_ID, batch)
ids = submitted["tasks"][func_id]
deadline = time.time() + 120
while True:
    results = gcc.get_batch_result(ids)
    if all(not r["pending"] for r in results.values()):
        break
    assert time.time() < deadline, results
    time.sleep(0.2)

print(json.dumps({
    "status": status["status"],
    "function_id": func_id,
    "task_id": task_id,
    "one": one,
    "batch": [results[i]["result"] for i in ids],
    "group": submitted["task_group_id"],
}))
