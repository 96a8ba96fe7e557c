"""A reservation block is never more than 1/16 of what the budget has left: under `up --cap 5000` one
62-byte answer held 4,158 bytes (83% of the cap) before; now at most 2 x 312."""

from __future__ import annotations

import asyncio

from meterkit import Upstream

from exfilguard.ledger import open_ledger
from exfilguard.ledger import reads
from exfilguard.ledger.events import decode_event
from exfilguard.meter import Meter, MeterConfig
from exfilguard.meter.blocks import ROOM_FRACTION, within_room


def test_within_room():
    assert within_room(4096, 5000) == 5000 // ROOM_FRACTION
    assert within_room(4096, 10**9) == 4096
    assert within_room(4096, 3) == 1  # near the end: one byte at a time, the ledger grants what fits
    assert within_room(4096, 0) == 1  # exhausted: the ledger denies


def test_a_small_answer_under_a_small_cap_holds_a_small_block(tmp_path):
    echo = Upstream("echo")
    cfg = MeterConfig(listen="127.0.0.1:0", upstream=echo.addr, ledger=f"sqlite:///{tmp_path}/l.db", cap=5000,
                      settle_idle=0.2)

    async def main() -> int:
        m = Meter(cfg)
        await m.start()
        r, w = await asyncio.open_connection(*m.listen_address)
        w.write(b"y" * 62)
        await r.readexactly(62)
        held = m.status()["outstanding_bytes"]
        w.close()
        await m.stop()
        return held

    try:
        held = asyncio.run(main())
    finally:
        echo.close()
    led = open_ledger(cfg.ledger, create=False)
    amounts = [ev["amount"] for ev in (decode_event(e) for _, e in reads.entries(led)) if ev["kind"] == "reserve"]
    st = reads.status(led)
    led.close()
    assert max(amounts) <= 5000 // ROOM_FRACTION, amounts
    assert held <= 2 * (5000 // ROOM_FRACTION)  # the current block and the pipelined next one
    assert st.used_bytes == 62  # settled at close: exactly what left
