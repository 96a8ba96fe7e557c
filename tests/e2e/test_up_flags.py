"""`up`'s operator flags (issue 24) and its isolation switch (issue 22): --host, a fixed --metrics,
the dashboard port, --budget-lifetime, the heads directory, --no-isolate; and the refusal where
the sandbox cannot run. Tiny random models, a real `up`, real sockets."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from test_up_supervise import EXE, Up, _answer, _free_port


def _occupy(host: str, port: int) -> socket.socket | None:
    """Hold host:port (None when something else already holds it: it is taken either way)."""
    s = socket.socket()
    try:
        s.bind((host, port))
        s.listen()
        return s
    except OSError:
        s.close()
        return None


def _up_fails(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXE, "up", "--strong", "tiny-random", "--weak", "tiny-random", "--cap", "5000",
                           "--data-dir", str(tmp_path / "d"), "--port", str(_free_port()), *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_flags_bad_values_and_taken_ports_are_one_line_errors(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        out = _up_fails(tmp_path, "--dashboard-port", str(taken))
        assert out.returncode == 2 and "pick another with --dashboard-port" in out.stderr, out.stderr
        out = _up_fails(tmp_path, "--metrics", f"127.0.0.1:{taken}")
        assert out.returncode == 2 and "pick another with --metrics" in out.stderr, out.stderr
    out = _up_fails(tmp_path, "--access-log", "/proc/no/such/access.jsonl")
    assert out.returncode == 2 and "cannot write the access log" in out.stderr and "[inside" not in out.stdout, out.stderr
    out = _up_fails(tmp_path, "--budget-lifetime", "soon")
    assert out.returncode == 2 and "'soon' is not a positive duration" in out.stderr, out.stderr
    out = _up_fails(tmp_path, "--strong", "openai:http://127.0.0.1:9/v1")
    assert out.returncode == 2 and "--no-isolate" in out.stderr and "[inside" not in out.stdout, out.stderr


def test_without_bwrap_up_refuses_unless_no_isolate(tmp_path):
    # A PATH without bwrap: the sandbox cannot start, and `up` says what to do instead of running the inside bare.
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    out = _up_fails(tmp_path, env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "bubblewrap (bwrap)" in out.stderr and "--no-isolate" in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_host_fixed_metrics_dashboard_fallback_lifetime_heads_and_no_isolate(tmp_path):
    port, mport = _free_port(), _free_port()
    data = tmp_path / "data"
    hold = _occupy("0.0.0.0", 8050)  # the dashboard's default port, taken: up picks another and says so
    try:
        # 127.0.0.2 is loopback too: it shows that --host is the address listened on, not 127.0.0.1.
        up = Up("--strong", "tiny-random", "--weak", "tiny-random", "--cap", "4000", "--port", str(port),
                "--host", "127.0.0.2", "--metrics", f"127.0.0.1:{mport}", "--data-dir", str(data),
                "--budget-lifetime", "90d", "--no-isolate", "--access-log", str(tmp_path / "logs" / "access.jsonl"))
        try:
            up.wait_for("Ctrl-C stops")
            text = up.text()
            assert "warning: --no-isolate" in text and "inside isolated" not in text
            assert re.search(r"note: the dashboard port's default 127\.0\.0\.2:8050 is taken .*--dashboard-port", text), text
            dport = int(re.search(r"dashboard http://127\.0\.0\.2:(\d+)/", text).group(1))
            assert dport != 8050
            with urllib.request.urlopen(f"http://127.0.0.2:{dport}/api/state", timeout=10) as r:
                assert r.status == 200
            assert f"meter status http://127.0.0.1:{mport}/status, metrics http://127.0.0.1:{mport}/metrics" in text
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
                assert b"exfilguard_meter" in r.read()
            url = re.search(r"base URL (http://\S+/v1)", text).group(1)
            key = re.search(r"API key: (\S+)", text).group(1)
            assert url == f"http://127.0.0.2:{port}/v1"
            assert _answer(url, key)
            # The access log goes to the file asked for, one JSON line per request; the dashboard's scrapes are not in it.
            lines = [json.loads(x) for x in (tmp_path / "logs" / "access.jsonl").read_text().splitlines()]
            assert [(a["path"], a["status"]) for a in lines if a["path"].endswith("/chat/completions")] == [("/v1/chat/completions", 200)]
            assert not any(a["path"] == "/metrics" for a in lines)
            assert f"access log {tmp_path / 'logs' / 'access.jsonl'}" in text
            with socket.socket() as s:  # not on 127.0.0.1
                assert s.connect_ex(("127.0.0.1", port)) != 0
            opid = int(re.search(r"outside pid (\d+)", text).group(1))
            ocmd = Path(f"/proc/{opid}/cmdline").read_bytes().split(b"\0")
            assert ocmd[ocmd.index(b"--budget-lifetime") + 1] == b"90d"
            mpid = int(re.search(r"meter pid (\d+)", text).group(1))
            assert b"--timing-charge" in Path(f"/proc/{mpid}/cmdline").read_bytes().split(b"\0")  # timing is egress, by default
            ipid = int(re.search(r"inside pid (\d+)", text).group(1))
            assert Path(f"/proc/{ipid}/cmdline").read_bytes().split(b"\0")[0] != b"/usr/bin/bwrap"
        finally:
            rc = up.stop()
        assert rc == 0, up.text()
    finally:
        if hold is not None:
            hold.close()
    # The meter published its signed heads outside the ledger, in DATA_DIR/heads.
    heads = sorted((data / "heads").glob("*"))
    assert heads, list(data.iterdir())
    assert {"tree_size", "root", "signature"} <= set(json.loads(heads[-1].read_text()))


def test_up_publishes_heads_outside_the_ledger_and_refuses_a_rolled_back_ledger(tmp_path):
    """Issue 22: by default `up` publishes signed heads to DATA_DIR/heads (which the inside cannot see),
    so a ledger rolled back to an earlier state (consistently: file and WAL together) is refused at the next start."""
    data = tmp_path / "data"
    args = ("--strong", "tiny-random", "--weak", "tiny-random", "--cap", "4000", "--data-dir", str(data),
            "--dashboard-port", "0", "--metrics", f"127.0.0.1:{_free_port()}")

    def run(answer: bool) -> None:
        up = Up(*args, "--port", str(port := _free_port()))
        try:
            up.wait_for("Ctrl-C stops")
            if answer:
                key = re.search(r"API key: (\S+)", up.text()).group(1)
                assert _answer(f"http://127.0.0.1:{port}/v1", key)
        finally:
            assert up.stop() == 0, up.text()

    run(answer=False)
    early = {p.name: p.read_bytes() for p in data.glob("ledger.sqlite*")}  # at rest: a consistent copy
    run(answer=True)
    assert sorted((data / "heads").glob("*")), "no head published"
    assert '"status":200' in (data / "access.jsonl").read_text()  # the access log's default home
    for p in data.glob("ledger.sqlite*"):
        p.unlink()
    for name, blob in early.items():
        (data / name).write_bytes(blob)
    out = subprocess.run([*EXE, "up", *args, "--port", str(_free_port())], capture_output=True, text=True, timeout=120)
    assert out.returncode == 5, out.stdout + out.stderr
    assert "[inside" not in out.stdout, out.stdout
