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


def _report(meter_port: int, status_url: str | None, hello_timeout: float = 2.0) -> tuple[int, dict]:
    async def main() -> tuple[int, dict]:
        conn = InsideConnection("127.0.0.1", meter_port, codecs=None, hello_timeout=hello_timeout)  # type: ignore[arg-type]
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
    assert body["budget"]["left_bytes"] == 0 and body["budget"]["forwarded_bytes"] == 0 and body["ledger"] == "ok"


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


def test_stalled_inside_says_why_after_the_colon(tmp_path):
    """An inside that accepts but never says HELLO (stalled): the reason is not empty after the colon."""
    import socket
    import threading

    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(silent.accept()[0])  # reads nothing, says nothing
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    m = MeterProcess(tmp_path, f"sqlite:///{tmp_path}/l.db", f"127.0.0.1:{silent.getsockname()[1]}", 10**6)
    try:
        m.wait_ready()
        code, body = _report(m.port, f"http://127.0.0.1:{m.metrics_port}/status", hello_timeout=60.0)
    finally:
        m.stop()
        silent.close()
        for c in held:
            c.close()
    assert code == 503
    head, _, why = body["reason"].partition(": ")
    assert head == "inside unreachable through the meter" and why.strip(), body["reason"]
    assert "no HELLO within" in why


def test_reserved_but_not_forwarded_is_not_spent():
    """After a meter restart its blocks can hold the whole cap while bytes are still there to forward:
    /health goes by what can still leave (remaining + reserved-not-forwarded), not by reservations."""
    import http.server
    import json
    import threading

    status = {"budget": "default", "state": "ok", "cap_bytes": 5000, "reserved_bytes": 5000, "remaining_bytes": 0,
              "cap_remaining_bytes": 0, "unforwarded_reserved_bytes": 4860}

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            b = json.dumps(status).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(b)))
            self.end_headers()
            self.wfile.write(b)

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        code, body = _report(free_port(), f"http://127.0.0.1:{srv.server_port}/status")
        assert "budget spent" not in (body["reason"] or "")
        assert body["budget"]["forwarded_bytes"] == 140 and body["budget"]["left_bytes"] == 4860
        status.update(unforwarded_reserved_bytes=0, forwarded_bytes=5000)
        code, body = _report(free_port(), f"http://127.0.0.1:{srv.server_port}/status")
        assert code == 503 and "budget spent" in body["reason"] and "forward 0 more" in body["reason"]
    finally:
        srv.shutdown()
