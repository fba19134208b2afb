"""The documentation's code, run as written, as a new user would run it: the quick start of
docs/python.md in a fresh virtualenv (`pip install ./sdk/python` from PyPI's cloudpickle), and
the unmodified script of docs/globus-compute.md against a node serving the Globus Compute API."""

import os
import re
import shutil
import subprocess
import tempfile

from conftest import _binary

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


def test_the_quick_start_runs_as_written_in_a_fresh_virtualenv():
    shell, = blocks("python.md", "sh", "Quick start")
    code, = blocks("python.md", "python", "Quick start")
    home = tempfile.mkdtemp(prefix="funcmesh-quickstart-")
    env = dict(os.environ, HOME=home,
               PATH=os.path.dirname(_binary()) + os.pathsep + os.environ["PATH"])
    env.pop("FUNCMESH_NODE", None)
    env.pop("PYTHONPATH", None)
    try:
        # The shell part, then the Python part in the shell it left (its venv, its FUNCMESH_NODE).
        script = shell + '\npython - <<"QUICKSTART"\n' + code + "QUICKSTART\n"
        out = subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        # (pip and `testnet up` print first.)
        lines = out.stdout.strip().splitlines()[-4:]
        assert lines == ["49", str([x * x for x in range(10)]), "101", "ValueError"], lines
        # It ran in the fresh virtualenv, with the package pip installed there.
        venv = os.path.join(home, "funcmesh-venv")
        found = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                                "import funcmesh; print(funcmesh.__file__)"],
                               capture_output=True, text=True, env=env, cwd=home)
        assert found.stdout.startswith(venv), found.stdout + found.stderr
    finally:
        subprocess.run([_binary(), "testnet", "down", "--dir",
                        os.path.join(home, "funcmesh-testnet")], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


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
