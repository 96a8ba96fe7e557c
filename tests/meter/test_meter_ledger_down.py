"""Ledger down: PostgreSQL stopped, SQLite file made read-only -> fail closed, log says why."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from meterkit import MeterProcess, Upstream, get_metrics, get_status, pull

from exfilguard.ledger import open_ledger
from exfilguard.ledger import reads


async def _read_some_then_wait_close(port: int, at_least: int, during, timeout: float = 30.0) -> tuple[int, int]:
    """Read until `at_least` bytes arrived, call during(), read until the meter closes; return (before, total)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    n = 0
    while n < at_least:
        b = await r.read(65536)
        assert b, "closed before the ledger went down"
        n += len(b)
    before = n
    await asyncio.get_running_loop().run_in_executor(None, during)
    try:
        async with asyncio.timeout(timeout):
            while b := await r.read(1 << 20):
                n += len(b)
    except (ConnectionError, OSError):
        pass
    w.close()
    return before, n


def _wait_state(m: MeterProcess, state: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = get_status(m.metrics_port)
        if st["state"] == state:
            return st
        time.sleep(0.1)
    raise AssertionError(f"meter never reached {state}: {st}")


@pytest.mark.postgres
def test_postgres_stopped(tmp_path, pg, pg_url):
    flood = Upstream("flood")
    m = MeterProcess(tmp_path, pg_url, flood.addr, 10**12, block=8192)
    try:
        m.wait_ready()
        before, total = asyncio.run(_read_some_then_wait_close(m.port, 200_000, lambda: pg.stop("fast")))
        st = _wait_state(m, "ledger_down")
        assert "cannot be written" in st["ledger_error"] or "connect" in st["ledger_error"]
        # New connections are refused: closed at once, no byte.
        assert asyncio.run(pull("127.0.0.1", m.port, 10)) == 0
        assert "exfilguard_meter_ledger_up 0.0" in get_metrics(m.metrics_port)
        log = m.log()
        assert "LEDGER UNAVAILABLE, failing closed" in log
        assert "refused: ledger_down" in log
    finally:
        pg.start()
    try:
        led = open_ledger(pg_url, create=False)
        # Everything the client got was reserved (committed) before PostgreSQL stopped.
        assert total <= reads.status(led, "default").reserved_bytes
        led.close()
        # The meter sees the ledger back and forwards again.
        _wait_state(m, "ok")
        assert asyncio.run(_first_bytes(m.port)) > 0
    finally:
        m.stop()
        flood.close()


async def _first_bytes(port: int) -> int:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    b = await asyncio.wait_for(r.read(1000), 10)
    w.close()
    return len(b)


def test_sqlite_made_read_only(tmp_path):
    flood = Upstream("flood")
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    m = MeterProcess(tmp_path, url, flood.addr, 10**12, block=8192)
    try:
        m.wait_ready()
        before, total = asyncio.run(_read_some_then_wait_close(m.port, 200_000, lambda: os.chmod(path, 0o444)))
        st = _wait_state(m, "ledger_down")
        assert "read-only" in st["ledger_error"]
        assert asyncio.run(pull("127.0.0.1", m.port, 10)) == 0
        log = m.log()
        assert "LEDGER UNAVAILABLE, failing closed" in log and "read-only" in log
        led = open_ledger(url, create=False)
        assert total <= reads.status(led, "default").reserved_bytes
        led.close()
        os.chmod(path, 0o644)
        _wait_state(m, "ok")
        assert asyncio.run(_first_bytes(m.port)) > 0
    finally:
        os.chmod(path, 0o644)
        assert m.stop() == 0
        flood.close()
