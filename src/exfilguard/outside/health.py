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


async def health_report(conn: InsideConnection, meter_status_url: str | None,
                        admission: Any = None) -> tuple[int, dict[str, Any]]:
    """Return (HTTP status, body) of the health check.

    The budget block names what each figure counts (bytes): forwarded (left through the meter),
    reserved (held against the cap: forwarded + reserved ahead), left (can still be forwarded),
    left_for_new_answers (less the allowances of answers in flight: what admission goes by)."""
    from exfilguard.outside.budget import AnswerCost, MeterFigures

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
            f = MeterFigures.from_status(st)
            cost = admission.cost if admission is not None else AnswerCost()
            left_new = None
            if admission is not None and f is not None:
                left_new, _ = await admission.left_for_new()
            body["budget"] = None if f is None else {
                "budget": st.get("budget"), "cap_bytes": f.cap, "forwarded_bytes": f.forwarded,
                "reserved_bytes": f.reserved, "left_bytes": f.left, "left_for_new_answers_bytes": left_new,
            }
            if state == "ledger_down":
                reasons.append(f"ledger down, the meter forwards nothing: {st.get('ledger_error') or 'unavailable'}")
            elif f is not None and (left_new if left_new is not None else f.left) < cost.bound(1):
                # By the bytes that can still leave, not by reservations: after a meter crash its
                # old blocks stay reserved while the budget still has bytes to forward. With
                # admission, by its own rule (a new connection's HELLO, answers in flight), so
                # /health and a client's next request agree.
                left = left_new if left_new is not None else f.left
                reasons.append(f"egress budget spent: {left} bytes left for new answers (the meter can forward "
                               f"{f.left} more) and an answer of one token may cost up to {cost.bound(1)}")
            elif state not in ("ok", "exhausted"):
                reasons.append(f"meter is {state or 'in an unknown state'}")
    if not reasons:
        # Through the meter: proves the path to the inside, not just the outside's own socket.
        try:
            await asyncio.wait_for(conn._connect(), 5.0)
            body["inside_connected"] = conn.hello is not None and conn._dead is None
        except (TimeoutError, asyncio.TimeoutError):
            reasons.append("inside unreachable through the meter: no HELLO within 5 s (the inside is stalled, "
                           "overloaded or still loading its models)")
        except (ExfilguardError, OSError) as exc:
            reasons.append(f"inside unreachable through the meter: {str(exc) or type(exc).__name__}")
        if not reasons and not body["inside_connected"]:
            reasons.append("inside unreachable through the meter")
    else:
        body["inside_connected"] = conn.hello is not None and conn._dead is None
    if reasons:
        body["status"] = "unavailable"
        body["reason"] = reasons[0]
        return 503, body
    return 200, body
