"""The documentation's code, run as written, as a new user would run it: the quick start of
docs/python.md in a fresh virtualenv (`pip install ./sdk/python` from PyPI's cloudpickle), and
the unmodified script of docs/globus-compute.md against a node serving the Globus Compute API."""

import os
import re
import shutil
import subprocess
import tempfile

import pytest

from conftest import _binary
from globus_compute_env import SDK_VERSION

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))


def blocks(doc, language, section):
    """The fenced `language` blocks of `section` (a `## ` heading) of docs/`doc`."""
    with open(os.path.join(ROOT, "docs", doc)) as f:
        text = f.read()
    start = text.index("\n## %s\n" % section)
    end = text.find("\n## ", start + 1)
    part = text[start:end if end > 0 else len(text)]
    return re.findall(r"```%s\n(.*?)```" % language, part, re.S)


def as_new_user():
    """A home and a way to run commands as a new user would: an ordinary account (as root, one
    made for it: a root node isolates workers under uids of their own, which cannot read a
    private home's virtualenv), with the binary installed in ~/bin and the repository's
    sdk/python at ~/funcmesh/sdk/python."""
    if os.geteuid() != 0:
        home = tempfile.mkdtemp(prefix="funcmesh-quickstart-")
        return home, [], os.getuid()
    user = "funcmesh-quickstart"
    if subprocess.run(["id", user], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", user], check=True)
    home = os.path.expanduser("~" + user)
    for leftover in ("funcmesh-venv", "funcmesh-testnet", "funcmesh", "bin"):
        shutil.rmtree(os.path.join(home, leftover), ignore_errors=True)
    uid = int(subprocess.run(["id", "-u", user], capture_output=True, text=True,
                             check=True).stdout)
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return home, [runuser, "-u", user, "--"], uid


def test_the_quick_start_runs_as_written_in_a_fresh_virtualenv():
    shell, = blocks("python.md", "sh", "Quick start")
    code, = blocks("python.md", "python", "Quick start")
    cells = blocks("python.md", "python", "A notebook-style example")
    # The notebook's cells, after the quick start, in one program.
    notebook = "".join(cells) + "print('notebook done')\n"
    home, prefix, uid = as_new_user()
    os.makedirs(os.path.join(home, "bin"), exist_ok=True)
    shutil.copy2(_binary(), os.path.join(home, "bin", "funcmesh"))
    repo = os.path.join(home, "funcmesh")
    shutil.copytree(os.path.join(ROOT, "sdk", "python"), os.path.join(repo, "sdk", "python"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    for d, _, files in os.walk(home):
        for name in [d] + [os.path.join(d, f) for f in files]:
            os.chown(name, uid, uid)
    env = {"HOME": home, "PATH": os.path.join(home, "bin") + ":/usr/local/bin:/usr/bin:/bin",
           "LANG": "C.UTF-8"}
    try:
        # The shell part, then the Python part in the shell it left (its venv, its FUNCMESH_NODE).
        script = (shell + '\npython - <<"QUICKSTART"\n' + code + "QUICKSTART\n"
                  + 'python - <<"NOTEBOOK"\n' + notebook + "NOTEBOOK\n")
        out = subprocess.run(prefix + ["bash", "-e", "-c", script], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        # (pip and `testnet up` print first.)
        lines = out.stdout.strip().splitlines()
        at = lines.index("49")
        assert lines[at:at + 4] == ["49", str([x * x for x in range(10)]), "101",
                                    "ValueError"], lines
        assert lines[at + 4:] == ["['a1', 'a2', 'b1', 'b2']", "3.1", "True", "True", "True",
                                  "SUCCEEDED", "notebook done"], lines
        # It ran in the fresh virtualenv, with the package pip installed there.
        venv = os.path.join(home, "funcmesh-venv")
        found = subprocess.run(prefix + [os.path.join(venv, "bin", "python"), "-c",
                                         "import funcmesh; print(funcmesh.__file__)"],
                               capture_output=True, text=True, env=env, cwd=home)
        assert found.stdout.startswith(venv), found.stdout + found.stderr
    finally:
        subprocess.run(prefix + [os.path.join(home, "bin", "funcmesh"), "testnet", "down",
                                 "--dir", os.path.join(home, "funcmesh-testnet")],
                       capture_output=True, env=env, cwd=home)
        if not prefix:
            shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("gc", [SDK_VERSION], indirect=True, ids=["sdk-" + SDK_VERSION])
def test_the_migration_pages_script_runs_unmodified(gc):
    python, node = gc
    code, = blocks("globus-compute.md", "python", "The script, unchanged")
    out = subprocess.run([python, "-c", code], env=node.env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "online", lines
    assert lines[1].startswith("Hello funcmesh from "), lines
    assert lines[2] == str([i * i for i in range(10)]), lines
    assert lines[3].startswith("remote error: ZeroDivisionError"), lines
