"""`exfilguard up` as a user runs it: the real defaults (SmolLM2 strong, shipped student weak,
SQLite ledger), the real openai client, SIGTERM, then an audit of the ledger it left."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.integration

EXE = str(Path(sys.executable).with_name("exfilguard"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(proc: subprocess.Popen) -> "queue.Queue[str]":
    q: "queue.Queue[str]" = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            q.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return q


def test_up_serves_signs_and_stops_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [EXE, "up", "--port", str(port), "--data-dir", str(data), "--dashboard-port", str(_free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out: list[str] = []
    try:
        q = _lines(proc)
        deadline = time.monotonic() + 240
        key = url = None
        while not (out and "Ctrl-C stops" in out[-1]) and time.monotonic() < deadline:
            try:
                line = q.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, "".join(out)
                continue
            out.append(line)
            if m := re.search(r"(http://127\.0\.0\.1:\d+/v1)", line):
                url = m.group(1)
            if m := re.match(r"API key: (\S+)", line):
                key = m.group(1)
        assert url == f"http://127.0.0.1:{port}/v1" and key, "".join(out)
        assert "weak default" in "".join(out)
        assert key in (data / "api-keys").read_text().split()

        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)
        r = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Name a color."}], max_tokens=12, seed=5, temperature=0.7
        )
        assert r.choices[0].message.content and r.usage.completion_tokens > 0
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, "".join(out)

    ledger = f"sqlite:///{(data / 'ledger.sqlite').resolve()}"
    status = subprocess.run([EXE, "ledger", "status", "--ledger", ledger, "--json"], capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    # Settled at clean stop: what left is counted, nothing is still reserved beyond it.
    assert 0 < st["used_bytes"] == st["reserved_bytes"] <= st["cap_bytes"]
    audit = subprocess.run(
        [EXE, "ledger", "verify", "--ledger", ledger, "--public-key", str(data / "meter-key.pub")],
        capture_output=True, text=True,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
    with sqlite3.connect(data / "ledger.sqlite") as db:  # verify checks every head; there must be one
        signed = db.execute("select count(*) from tree_heads where signature is not null").fetchone()[0]
    assert signed >= 1
    # The outside logged the answer; a trusted SmolLM2 re-runs it under its seed and agrees.
    check = subprocess.run(
        [EXE, "verify", "--log", str(data / "request-log.jsonl"), "--strong", "smollm2", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert report["records"] == 1 and len(report["scores"]) == 1 and not report["scores"][0]["flagged"], report
