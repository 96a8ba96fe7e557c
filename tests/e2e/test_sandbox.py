"""The inside's sandbox (supervise/sandbox.py) on its own: what a process in it can and cannot see.
Real bwrap, real namespaces (CI runs as root; elsewhere unprivileged user namespaces)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exfilguard.supervise.sandbox import Sandbox, check_available, prepare_socket_dir, python_trees

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (make sandbox-deps)")

PROBE = r"""
import json, os, socket, sys
out = {"uid": os.getuid(), "env_secret": os.environ.get("EXFILGUARD_TEST_SECRET_TOKEN"), "pg": os.environ.get("PGPASSWORD")}
def ls(p):
    try: return sorted(os.listdir(p))
    except OSError as e: return type(e).__name__
out["hidden"] = ls(sys.argv[1])
out["tree"] = ls(sys.argv[2])
out["run"] = ls("/run/exfilguard")
out["ifaces"] = sorted(n for _, n in socket.if_nameindex())
out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
import torch  # the ML stack loads from the read-only venv
print(json.dumps(out))
"""


def test_a_process_in_the_sandbox_sees_only_what_it_must(tmp_path: Path) -> None:
    check_available()
    tree = tmp_path / "tree"
    hidden = tree / "data"  # a DATA_DIR under a tree the inside may read: masked anyway
    hidden.mkdir(parents=True)
    (hidden / "meter-key").write_text("secret")
    (tree / "model.bin").write_text("weights")
    sock = tmp_path / "sock"
    prepare_socket_dir(sock)
    sb = Sandbox(readable=[*python_trees(["tiny-random"]), tree], hidden=[hidden], socket_dir=sock)
    env = {**os.environ, "EXFILGUARD_TEST_SECRET_TOKEN": "x", "PGPASSWORD": "hunter2"}
    r = subprocess.run(sb.wrap([sys.executable, "-c", PROBE, str(hidden), str(tree)]), capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["hidden"] == [] and out["tree"] == ["data", "model.bin"]
    assert out["pg"] is None and out["env_secret"] is None  # the environment is cleared: only what Python and torch need passes
    assert out["ifaces"] == ["lo"]
    assert max(out["pids"]) < 10  # its own PID namespace: a handful of processes, none of the host's
    assert out["uid"] == (65534 if os.geteuid() == 0 else os.geteuid())
    assert out["run"] == []
    # What it writes in its socket directory is visible to the meter; nothing else it writes is.
    r = subprocess.run(sb.wrap([sys.executable, "-c", "open('/run/exfilguard/x', 'w').write('1'); open('/tmp/y', 'w').write('2')"]),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (sock / "x").read_text() == "1" and not Path("/tmp/y").exists()


def test_a_data_dir_that_holds_the_code_is_refused(tmp_path: Path) -> None:
    import subprocess as sp

    from exfilguard.errors import ConfigError
    from exfilguard.supervise.sandbox import check_layout

    with pytest.raises(ConfigError, match="keep DATA_DIR, the ledger and the signing key in a directory of their own"):
        check_layout([tmp_path / "venv", tmp_path / "src"], [tmp_path])
    check_layout([tmp_path / "venv"], [tmp_path / "data"])  # beside it: fine
    # Through `up`: refused before anything is written there (no key made) or started.
    code = tmp_path / "code"
    code.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = sp.run([sys.executable, "-m", "exfilguard.cli.main", "up", "--strong", "tiny-random", "--weak", "tiny-random",
                "--cap", "5000", "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "of their own" in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "meter-key").exists()
