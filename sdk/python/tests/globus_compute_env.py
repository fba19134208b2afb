"""What the Globus Compute tests stand on: the real `globus-compute-sdk` from PyPI in a virtualenv
of its own, a private RabbitMQ, and a one-node testnet whose node serves the Globus Compute API
(on 127.0.0.1:5000, where the SDK's `local` environment points: the SDK cannot be told
otherwise) and whose endpoint runs its workers in that virtualenv."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

SDK_VERSION = os.environ.get("FUNCMESH_GC_SDK_VERSION", "4.19.0")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception as e:  # noqa: BLE001 - reported if it never comes
            last = e
        time.sleep(0.2)
    raise TimeoutError("%s did not happen within %ds (last error: %r)" % (what, timeout, last))


def sdk_venv(version=SDK_VERSION):
    """A virtualenv with globus-compute-sdk==version from PyPI (kept between runs under
    /var/cache/funcmesh, or FUNCMESH_GC_VENV_DIR)."""
    venv = os.path.join(os.environ.get("FUNCMESH_GC_VENV_DIR", "/var/cache/funcmesh"),
                        "gc-venv-%s" % version)
    python = os.path.join(venv, "bin", "python")
    probe = [python, "-c", "import globus_compute_sdk, sys; "
             "sys.stdout.write(globus_compute_sdk.__version__)"]
    if os.path.exists(python):
        found = subprocess.run(probe, capture_output=True, text=True)
        if found.returncode == 0 and found.stdout == version:
            return python
        shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "globus-compute-sdk==%s" % version], check=True)
    found = subprocess.run(probe, capture_output=True, text=True, check=True)
    assert found.stdout == version, found.stdout
    return python


class RabbitMQ:
    """A private RabbitMQ (Debian's rabbitmq-server) on free loopback ports, in a temp dir."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="funcmesh-rabbitmq-")
        self.port = free_port()
        self.epmd_port = free_port()
        home = os.path.join(self.dir, "home")
        os.makedirs(home)
        with open(os.path.join(self.dir, "rabbitmq.conf"), "w") as f:
            f.write("loopback_users = none\n")
        with open(os.path.join(self.dir, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        name = "funcmesh%d" % self.port
        self.env = dict(
            os.environ,
            HOME=home,
            RABBITMQ_NODENAME="%s@localhost" % name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(free_port()),
            RABBITMQ_MNESIA_BASE=os.path.join(self.dir, "mnesia"),
            RABBITMQ_LOG_BASE=os.path.join(self.dir, "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(self.dir, "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=os.path.join(self.dir, "rabbitmq"),
            RABBITMQ_PID_FILE=os.path.join(self.dir, "pid"),
            ERL_EPMD_PORT=str(self.epmd_port),
        )
        server = shutil.which("rabbitmq-server", path="/usr/lib/rabbitmq/bin") or shutil.which(
            "rabbitmq-server")
        if not server:
            raise RuntimeError("RabbitMQ is not installed: apt-get install rabbitmq-server")
        self.log = open(os.path.join(self.dir, "server.log"), "wb")
        self.proc = subprocess.Popen([server], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.url = "amqp://guest:guest@127.0.0.1:%d/" % self.port
        try:
            wait_for("RabbitMQ taking AMQP connections", self._ready, 90)
        except BaseException:
            self.stop()
            raise

    def _ready(self):
        if self.proc.poll() is not None:
            with open(os.path.join(self.dir, "server.log")) as f:
                raise RuntimeError("rabbitmq-server exited: %s" % f.read()[-2000:])
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"AMQP\x00\x00\x09\x01")
            # Connection.Start: a method frame (type 1) once the broker is up.
            return s.recv(1)[:1] == b"\x01"

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        subprocess.run([epmd, "-port", str(self.epmd_port), "-kill"], env=self.env,
                       capture_output=True)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Node:
    """A one-node testnet (coordinator and a1) whose a1 serves the Globus Compute API."""

    def __init__(self, binary, python, amqp_url, listen="127.0.0.1:5000"):
        self.binary = binary
        self.tmp = tempfile.mkdtemp(prefix="funcmesh-gc-")
        self.net = os.path.join(self.tmp, "net")
        subprocess.run([binary, "testnet", "up", "--dir", self.net, "--institutions", "1",
                        "--nodes-per-institution", "1"], check=True, stdout=subprocess.DEVNULL)
        self.a1 = os.path.join(self.net, "a1")
        try:
            self._serve_globus_compute(python, amqp_url, listen)
            self.endpoint_id = self._endpoint_uuid()
            # The environment a user sets, read from the node as `funcmesh compat env` prints it.
            out = subprocess.run([binary, "compat", "env", "--node", self.a1, "--json"],
                                 check=True, capture_output=True, text=True).stdout
            creds = json.loads(out)
            self.env = dict(
                os.environ,
                GLOBUS_SDK_ENVIRONMENT="local",
                GLOBUS_SDK_SERVICE_URL_AUTH=creds["url"] + "/",
                GLOBUS_COMPUTE_CLIENT_ID=creds["client_id"],
                GLOBUS_COMPUTE_CLIENT_SECRET=creds["token"],
                GLOBUS_COMPUTE_USER_DIR=os.path.join(self.tmp, "globus_compute"),
                ENDPOINT_ID=self.endpoint_id,
            )
            # SDK 2.x reads the client's id and secret under its older names.
            self.env.update(FUNCX_SDK_CLIENT_ID=self.env["GLOBUS_COMPUTE_CLIENT_ID"],
                            FUNCX_SDK_CLIENT_SECRET=self.env["GLOBUS_COMPUTE_CLIENT_SECRET"])
        except BaseException:
            self.stop()
            raise

    def _serve_globus_compute(self, python, amqp_url, listen):
        """Restarts a1 with the Globus Compute API on and its endpoint's workers in `python`."""
        subprocess.run([self.binary, "testnet", "kill", "--dir", self.net, "a1"], check=True,
                       stdout=subprocess.DEVNULL)
        path = os.path.join(self.a1, "config.toml")
        with open(path) as f:
            text = f.read()
        # The node writes every setting: switch on the API, and run the endpoint's workers
        # with the SDK's virtualenv's python.
        def replace(old, new):
            assert text.count(old) == 1, "%r is not in %s once" % (old, path)
            return text.replace(old, new)

        text = replace('globus_compute = false\nlisten = "127.0.0.1:5000"\n',
                       "globus_compute = true\nlisten = %s\namqp_url = %s\n"
                       % (json.dumps(listen), json.dumps(amqp_url)))
        text = replace('python = "python3"\n', "python = %s\n" % json.dumps(python))
        with open(path, "w") as f:
            f.write(text)
        subprocess.run([self.binary, "testnet", "restart", "--dir", self.net, "a1"], check=True,
                       stdout=subprocess.DEVNULL)

    def _endpoint_uuid(self):
        found = {}

        def listed():
            out = subprocess.run([self.binary, "endpoint", "list", "--node", self.a1, "--json"],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                return False
            for e in json.loads(out.stdout):
                if e.get("peer_id") and e["name"]:
                    found["id"] = e["id"]
            return "id" in found

        wait_for("a1's endpoint in its registry", listed, 60)
        h = found["id"]
        return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])

    def stop(self):
        subprocess.run([self.binary, "testnet", "down", "--dir", self.net],
                       stdout=subprocess.DEVNULL)
        shutil.rmtree(self.tmp, ignore_errors=True)
