"""A Globus Compute script, unmodified: the Executor, with results over RabbitMQ."""

import concurrent.futures
import json
import os

from globus_compute_sdk import Executor
from globus_compute_sdk.errors import TaskExecutionFailed

ENDPOINT_ID = os.environ["ENDPOINT_ID"]


def square(x):
    return x * x


def divide(a, b):
    return a / b


with Executor(endpoint_id=ENDPOINT_ID) as gce:
    one = gce.submit(square, 12).result(timeout=120)
    # The SDK's Executor.map raises NotImplementedError: a map is a list of submits.
    futures = [gce.submit(square, i) for i in range(200)]
    squares = [f.result(timeout=300) for f in futures]
    failed = gce.submit(divide, 1, 0)
    try:
        failed.result(timeout=120)
        error = None
    except TaskExecutionFailed as e:
        error = str(e)
    # Nor does it inherit concurrent.futures' map; that map, over its submit, works.
    mapped = list(concurrent.futures.Executor.map(gce, square, range(50), timeout=300))
    group = str(gce.task_group_id)

print(json.dumps({"one": one, "squares": squares, "error": error, "map": mapped,
                  "group": group}))
