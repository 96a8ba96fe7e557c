"""Finding 2 of issue 11: a meter started on a ledger whose budgets row was lowered refuses to start."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time

import pytest
from meterkit import Upstream, free_port, pull

from exfilguard.ledger import open_ledger
from exfilguard.ledger import reads

EXFILGUARD = [sys.executable, "-m", "exfilguard.cli.main"]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    return request.getfixturevalue("pg_url")


def _tamper(url: str, sql: str) -> None:
    if url.startswith("postgresql"):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql)
        return
    conn = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
    conn.execute(sql)
    conn.close()


def test_meter_refuses_lowered_reserved_bytes(url):
    # An exhausted budget: cap 400, 400 used.
    led = open_ledger(url)
    led.ensure_budget("default", 400)
    g = led.reserve("default", 400, "m", 1)
    led.release(g.res, 400)
    size = reads.tree_head(led).tree_size
    led.close()
    _tamper(url, "UPDATE budgets SET reserved_bytes = 0 WHERE name = 'default'")

    flood = Upstream("flood")
    port = free_port()
    try:
        cmd = [*EXFILGUARD, "meter", "--listen", f"127.0.0.1:{port}", "--upstream", flood.addr,
               "--ledger", url, "--cap", "400", "--upstream-wait", "2"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            got = asyncio.run(pull("127.0.0.1", port, 10))  # try to pull while it starts
            _out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    finally:
        flood.close()
    assert proc.returncode == 5, err
    assert "does not add up" in err and "reserved=0" in err and "reserved=400" in err
    assert got == 0
    # Nothing was written: no reservation, no meter_start.
    led = open_ledger(url, create=False)
    assert reads.tree_head(led).tree_size == size
    assert reads.status(led, "default").reserved_bytes == 0  # the tampered row is left for the auditor
    led.close()


def test_a_cap_raised_in_the_row_while_running_is_not_reported_as_fine(tmp_path):
    """`UPDATE budgets SET cap_bytes = ...` at rest: /status, the remaining-bytes metric and `ledger
    status` never show the tampered figure as fine; the meter fails closed at its next probe."""
    from meterkit import MeterProcess, get_metrics, get_status

    url = f"sqlite:///{tmp_path}/ledger.db"
    echo = Upstream("echo")
    m = MeterProcess(tmp_path, url, echo.addr, 5000)
    try:
        m.wait_ready()
        _tamper(url, "UPDATE budgets SET cap_bytes = 5000000 WHERE name = 'default'")
        seen = []
        for _ in range(200):
            st = get_status(m.metrics_port)
            seen.append((st["state"], st["cap_bytes"], st["remaining_bytes"]))
            if st["state"] == "ledger_down":
                break
            time.sleep(0.05)
        assert st["state"] == "ledger_down" and "does not add up" in st["ledger_error"], seen
        assert all(cap == 5000 and left <= 5000 for _state, cap, left in seen), seen
        metrics = get_metrics(m.metrics_port)
        assert "exfilguard_meter_remaining_bytes 5000000" not in metrics and "exfilguard_meter_ledger_up 0.0" in metrics
    finally:
        m.stop()
        echo.close()
    out = subprocess.run([*EXFILGUARD, "ledger", "status", "--ledger", url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 5 and "cap=5000000" in out.stderr and "5000000 B" not in out.stdout
