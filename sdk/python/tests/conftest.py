"""A one-node funcmesh testnet for the SDK's tests (the real `funcmesh` binary)."""

import os
import shutil
import subprocess
import tempfile
import time

import pytest

import funcmesh
from globus_compute_env import SDK_VERSION, Node, RabbitMQ, sdk_venv


def _binary():
    found = os.environ.get("FUNCMESH_BIN")
    if found:
        return found
    target = os.environ.get("CARGO_TARGET_DIR", "/var/cache/funcmesh/target")
    path = os.path.join(target, "debug", "funcmesh")
    if os.path.exists(path):
        return path
    found = shutil.which("funcmesh")
    if not found:
        raise RuntimeError("build funcmesh first (cargo build), or set FUNCMESH_BIN")
    return found


@pytest.fixture(scope="session")
def node():
    """The data dir of a1, the endpoint node of a one-node testnet, once it runs tasks."""
    binary = _binary()
    tmp = tempfile.mkdtemp(prefix="funcmesh-sdk-")
    net = os.path.join(tmp, "net")
    subprocess.run([binary, "testnet", "up", "--dir", net, "--institutions", "1",
                    "--nodes-per-institution", "1"], check=True, stdout=subprocess.DEVNULL)
    a1 = os.path.join(net, "a1")
    try:
        client = funcmesh.Client(node=a1)
        deadline = time.time() + 60
        while True:
            try:
                if client.result(client.run(abs, -1), timeout=30) == 1:
                    break
            except funcmesh.FuncmeshError:
                # Not routable yet: the endpoint's first advert is on its way.
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        yield a1
    finally:
        subprocess.run([binary, "testnet", "down", "--dir", net], stdout=subprocess.DEVNULL)
        shutil.rmtree(tmp, ignore_errors=True)


# The SDK the Globus Compute tests run: the current one, and the oldest the API serves.
GC_SDKS = [SDK_VERSION, "2.3.0"]


@pytest.fixture(scope="session", params=GC_SDKS, ids=["sdk-" + v for v in GC_SDKS])
def gc(request):
    """The Globus Compute SDK's virtualenv's python, and a node serving the Globus Compute API
    (results to a private RabbitMQ) whose endpoint runs workers in that virtualenv; once per
    SDK version (one at a time: the SDK's `local` service is always localhost:5000)."""
    python = sdk_venv(request.param)
    broker = RabbitMQ()
    try:
        node = Node(_binary(), python, broker.url)
        try:
            yield python, node
        finally:
            node.stop()
    finally:
        broker.stop()
