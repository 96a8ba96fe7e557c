"""`GET /health` of the outside: the meter, the ledger, the budget and the inside, as they are now.

200 only when the meter answers and forwards (state ok, bytes left), the ledger is up and the
inside answers through the meter; otherwise 503 with the first reason in ``reason``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from exfilguard.errors import ExfilguardError
from exfilguard.outside.client import InsideConnection


async def _meter_status(url: str) -> tuple[dict[str, Any] | None, str]:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=2.0) as c:
            r = await c.get(url)
        d = r.json()
    except Exception as exc:
        return None, f"meter status {url} unreachable ({type(exc).__name__})"
    if not isinstance(d, dict):
        return None, f"meter status {url} answered no JSON object"
    return d, ""


async def health_report(conn: InsideConnection, meter_status_url: str | None) -> tuple[int, dict[str, Any]]:
    """Return (HTTP status, body) of the health check."""
    reasons: list[str] = []
    body: dict[str, Any] = {"status": "ok", "reason": None, "meter": None, "ledger": "unknown", "budget": None,
                            "inside_connected": False}
    if meter_status_url:
        st, why = await _meter_status(meter_status_url)
        if st is None:
            body["meter"] = "down"
            reasons.append(why)
        else:
            state = str(st.get("state", ""))
            body["meter"] = state
            body["ledger"] = "down" if state == "ledger_down" else "ok"
            body["budget"] = {k: st.get(k) for k in ("budget", "cap_bytes", "reserved_bytes", "remaining_bytes")}
            remaining = st.get("remaining_bytes")
            if state == "ledger_down":
                reasons.append(f"ledger down, the meter forwards nothing: {st.get('ledger_error') or 'unavailable'}")
            elif state == "exhausted" or (isinstance(remaining, int) and remaining <= 0):
                reasons.append("egress budget spent: the meter forwards nothing more")
            elif state != "ok":
                reasons.append(f"meter is {state or 'in an unknown state'}")
    if not reasons:
        # Through the meter: proves the path to the inside, not just the outside's own socket.
        try:
            await asyncio.wait_for(conn._connect(), 5.0)
            body["inside_connected"] = conn.hello is not None and conn._dead is None
        except (TimeoutError, ExfilguardError, OSError) as exc:
            reasons.append(f"inside unreachable through the meter: {exc or type(exc).__name__}")
        if not reasons and not body["inside_connected"]:
            reasons.append("inside unreachable through the meter")
    else:
        body["inside_connected"] = conn.hello is not None and conn._dead is None
    if reasons:
        body["status"] = "unavailable"
        body["reason"] = reasons[0]
        return 503, body
    return 200, body
