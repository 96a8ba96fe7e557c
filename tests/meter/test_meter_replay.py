"""Finding 2 of issue 11: a meter started on a ledger whose budgets row was lowered refuses to start."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys

import pytest
from meterkit import Upstream, free_port, pull

from exfilguard.ledger import open_ledger

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
    size = led.tree_head().tree_size
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
    assert led.tree_head().tree_size == size
    assert led.status("default").reserved_bytes == 0  # the tampered row is left for the auditor
    led.close()
