"""Findings 4 and 5 of issue 11: `up` runs inside, meter and outside as three supervised processes.

Tiny random models (the test is about processes, not answers); a real `up`, real sockets, the
real openai client, kill -9.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai

EXE = [sys.executable, "-m", "exfilguard.cli.main"]
CHILDREN = ("meter", "inside", "outside")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Up:
    """`exfilguard up` as a subprocess; every output line collected."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([*EXE, "up", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.out: list[str] = []
        self.q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.q.put(line)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match[str]:
        """Poll the output until a line matches (the lines before it are kept)."""
        deadline = time.monotonic() + timeout
        for line in self.out:
            if m := re.search(pattern, line):
                return m
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, f"up exited {self.proc.returncode}:\n" + self.text()
                continue
            self.out.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r}:\n" + self.text())

    def text(self) -> str:
        while True:
            try:
                self.out.append(self.q.get_nowait())
            except queue.Empty:
                return "".join(self.out)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def _health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _poll(fn, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"{what} did not happen within {timeout}s (last: {last})")


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def _worker_of(pid: int) -> int:
    """The python process at the bottom of the inside's sandbox (bwrap -> bwrap -> python)."""
    while True:
        kids = _children(pid)
        if not kids:
            return pid
        pid = kids[0]


def _uid(pid: int) -> int:
    return int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:")).split()[1])


def _answer(url: str, key: str, max_tokens: int = 8) -> str | None:
    try:
        r = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120).chat.completions.create(
            model="tiny-random", messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens, seed=1)
    except (openai.APIStatusError, openai.APIConnectionError):
        return None
    return r.choices[0].message.content or " "


def _spend(url: str, key: str) -> int:
    try:
        openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120).chat.completions.create(
            model="tiny-random", messages=[{"role": "user", "content": "hi"}], max_tokens=64)
    except openai.APIStatusError as e:
        return e.status_code
    return 200


def test_up_three_processes_supervised(tmp_path):
    port, dport = _free_port(), _free_port()
    data = tmp_path / "data"
    # No --weak: the supervisor picks the shipped student (`default`) without loading torch. It predicts
    # tiny-random's tokens badly, so answers cost bytes and the budget can be spent; the 500-byte block
    # bounds what each kill -9 of the meter leaves reserved.
    up = Up("--strong", "tiny-random", "--cap", "4000", "--reserve-block", "500",
            "--port", str(port), "--data-dir", str(data), "--dashboard-port", str(dport))
    try:
        up.wait_for("Ctrl-C stops")
        text = up.text()
        url = re.search(r"base URL (http://127\.0\.0\.1:\d+/v1)", text).group(1)
        key = re.search(r"API key: (\S+)", text).group(1)
        status_url = re.search(r"meter status (http://\S+/status), metrics (http://\S+/metrics)", text).group(1)
        pids = dict(zip(CHILDREN, map(int, re.search(
            r"processes: meter pid (\d+), inside pid (\d+), outside pid (\d+)", text).groups())))

        # Finding 5: three processes, children of up; only the inside holds the strong model.
        assert len(set(pids.values()) | {up.proc.pid}) == 4
        assert all(_ppid(p) == up.proc.pid for p in pids.values())
        cmd = {n: Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0") for n, p in pids.items()}
        assert b"--strong" in cmd["inside"] and b"--strong" not in cmd["outside"] and b"--strong" not in cmd["meter"]
        # The inside is sandboxed by default: the supervised process is bwrap; the worker runs below it as nobody.
        assert cmd["inside"][0].endswith(b"/bwrap"), cmd["inside"][:3]
        worker = _worker_of(pids["inside"])
        assert _uid(worker) == (65534 if os.geteuid() == 0 else os.geteuid()) and _uid(pids["meter"]) == os.geteuid()
        maps = {n: Path(f"/proc/{worker if n == 'inside' else p}/maps").read_text() for n, p in pids.items()}
        assert "torch" in maps["inside"] and "torch" not in maps["meter"]
        # The supervisor loads no ML library either (issue 21/22: it used to map libtorch to pick the weak model).
        assert "torch" not in Path(f"/proc/{up.proc.pid}/maps").read_text()
        with urllib.request.urlopen(status_url, timeout=5) as r:
            assert json.loads(r.read())["state"] == "ok"
        # The operator dashboard is a fourth child: no model, reads the ledger and the meter's metrics.
        dpid = int(re.search(rf"dashboard http://127\.0\.0\.1:{dport}/ \(pid (\d+)\)", text).group(1))
        assert _ppid(dpid) == up.proc.pid and "torch" not in Path(f"/proc/{dpid}/maps").read_text()
        state = _poll(lambda: (lambda st: st if st.get("budgets") else None)(
            json.loads(urllib.request.urlopen(f"http://127.0.0.1:{dport}/api/state", timeout=10).read())), "dashboard state")
        assert [b["cap_bytes"] for b in state["budgets"] if b["budget"] == "default"] == [4000], state["budgets"]

        assert _answer(url, key)
        code, body = _health(port)
        assert code == 200 and body["meter"] == "ok" and body["ledger"] == "ok" and body["inside_connected"], body

        # Finding 4: kill -9 of each child is logged, the child restarted, and the service comes back.
        for name in CHILDREN:
            old = pids[name]
            os.kill(old, signal.SIGKILL)
            up.wait_for(rf"up: {name} \(pid {old}\) died with signal SIGKILL")
            pids[name] = int(up.wait_for(rf"up: {name} restarted \(pid (\d+)\)").group(1))
            assert pids[name] != old
            _poll(lambda: _answer(url, key), f"an answer after {name} was killed")
            _poll(lambda: _health(port)[0] == 200, f"/health 200 after {name} was killed")

        # /health tells the truth about the ledger: made read-only, it is down.
        ledger = data / "ledger.sqlite"
        os.chmod(ledger, 0o444)
        try:
            # The meter cuts the outside's connection at the probe that flips its /status, so /health may say
            # "inside unreachable" first; it must come to name the ledger.
            code, body = _poll(lambda: (lambda h: h if h[0] == 503 and h[1].get("ledger") == "down" else None)(_health(port)),
                               "/health 503 ledger down")
            assert "ledger down" in body["reason"], body
        finally:
            os.chmod(ledger, 0o644)
        _poll(lambda: _health(port)[0] == 200, "/health 200 again")

        # ... and about the budget: spend it, then 503 with the reason.
        # Admission may refuse (429) a little before /health calls the budget spent: a new connection's HELLO
        # costs bytes that an answer on an open connection does not. So spend until both say so.
        _poll(lambda: _spend(url, key) == 429 and _health(port)[0] == 503, "the budget running out (429, /health 503)",
              timeout=300)
        code, body = _health(port)
        assert code == 503 and "budget spent" in body["reason"], body
    finally:
        rc = up.stop()
    assert rc == 0, up.text()
    assert all(not Path(f"/proc/{p}").exists() or Path(f"/proc/{p}/stat").read_text().split()[2] == "Z" for p in pids.values())
    audit = subprocess.run([*EXE, "ledger", "verify", "--ledger", f"sqlite:///{data / 'ledger.sqlite'}",
                            "--public-key", str(data / "meter-key.pub")], capture_output=True, text=True, timeout=60)
    assert audit.returncode == 0, audit.stdout + audit.stderr


def _up_fails(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXE, "up", "--strong", "tiny-random", "--weak", "tiny-random", "--data-dir", str(tmp_path / "d"),
                           *args], capture_output=True, text=True, timeout=120)


def test_up_startup_errors_before_models_load(tmp_path):
    from exfilguard.ledger import open_ledger

    (tmp_path / "d").mkdir()
    led = open_ledger(f"sqlite:///{tmp_path / 'd' / 'ledger.sqlite'}")
    led.ensure_budget("default", 5000)
    led.close()
    out = _up_fails(tmp_path, "--cap", "6000", "--port", str(_free_port()))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "refusing to start with --cap 6000" in out.stderr and out.stderr.count("\n") == 1
    assert "[inside" not in out.stdout and "models loaded" not in out.stdout

    (tmp_path / "bad.key").write_text("not a key")
    out = _up_fails(tmp_path, "--cap", "5000", "--signing-key", str(tmp_path / "bad.key"), "--port", str(_free_port()))
    assert out.returncode == 2 and "is not a PEM private key" in out.stderr and "[inside" not in out.stdout

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        out = _up_fails(tmp_path, "--cap", "5000", "--port", str(busy.getsockname()[1]))
    assert out.returncode == 2 and "is not available" in out.stderr and "[inside" not in out.stdout

    out = _up_fails(tmp_path, "--cap", "5000", "--reserve-block", "lots", "--port", str(_free_port()))
    assert out.returncode == 2 and "--reserve-block 'lots'" in out.stderr

    # A tampered ledger: the meter refuses, up exits with the tampered code before any model loads.
    import sqlite3

    with sqlite3.connect(tmp_path / "d" / "ledger.sqlite") as db:
        db.execute("UPDATE budgets SET reserved_bytes = 1")
    out = _up_fails(tmp_path, "--cap", "5000", "--port", str(_free_port()))
    assert out.returncode == 5 and "does not add up" in out.stderr and "[inside" not in out.stdout
