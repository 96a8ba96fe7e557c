"""/health tells the truth: the meter's state, the ledger, the budget and the path to the inside (real meter processes)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "meter"))
from meterkit import MeterProcess, Upstream, free_port  # noqa: E402

from exfilguard.outside.client import InsideConnection  # noqa: E402
from exfilguard.outside.health import health_report  # noqa: E402


def _report(meter_port: int, status_url: str | None) -> tuple[int, dict]:
    async def main() -> tuple[int, dict]:
        conn = InsideConnection("127.0.0.1", meter_port, codecs=None, hello_timeout=2.0)  # type: ignore[arg-type]
        try:
            return await health_report(conn, status_url)
        finally:
            await conn.close()

    return asyncio.run(main())


def test_meter_down_is_503():
    code, body = _report(free_port(), f"http://127.0.0.1:{free_port()}/status")
    assert code == 503 and body["meter"] == "down" and "unreachable" in body["reason"]


def test_budget_spent_is_503(tmp_path):
    echo = Upstream("echo")
    m = MeterProcess(tmp_path, f"sqlite:///{tmp_path}/l.db", echo.addr, 0)
    try:
        m.wait_ready()
        code, body = _report(m.port, f"http://127.0.0.1:{m.metrics_port}/status")
    finally:
        m.stop()
        echo.close()
    assert code == 503 and body["meter"] == "exhausted" and "budget spent" in body["reason"]
    assert body["budget"]["remaining_bytes"] == 0 and body["ledger"] == "ok"


def test_ledger_down_and_inside_unreachable_are_503(tmp_path):
    echo = Upstream("echo")  # not an inside worker: it never says HELLO
    path = tmp_path / "l.db"
    m = MeterProcess(tmp_path, f"sqlite:///{path}", echo.addr, 10**6)
    try:
        m.wait_ready()
        code, body = _report(m.port, f"http://127.0.0.1:{m.metrics_port}/status")
        assert code == 503 and body["meter"] == "ok" and "inside unreachable through the meter" in body["reason"], body
        os.chmod(path, 0o444)
        for _ in range(100):
            code, body = _report(m.port, f"http://127.0.0.1:{m.metrics_port}/status")
            if body["ledger"] == "down":
                break
            asyncio.run(asyncio.sleep(0.1))
        assert code == 503 and body["ledger"] == "down" and "ledger down" in body["reason"] and "read-only" in body["reason"]
    finally:
        os.chmod(path, 0o644)
        m.stop()
        echo.close()
