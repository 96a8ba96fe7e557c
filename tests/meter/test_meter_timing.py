"""Timing is egress (--timing-charge): every connection's open and close and every upstream read shorter
than EVENT_MIN are counted in the ledger as a fixed minimum, before the client can see them."""

from __future__ import annotations

import asyncio

import pytest

from exfilguard.ledger import open_ledger
from exfilguard.ledger import reads
from exfilguard.meter import Meter, MeterConfig
from exfilguard.meter.blocks import CLOSE_CHARGE, EVENT_MIN, OPEN_CHARGE


async def _serve(handler) -> tuple[asyncio.base_events.Server, str]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    return srv, "127.0.0.1:%d" % srv.sockets[0].getsockname()[1]


async def _read_all(addr) -> int:
    r, w = await asyncio.open_connection(*addr)
    n = 0
    while b := await r.read(65536):
        n += len(b)
    w.close()
    return n


def _run(tmp_path, handler, clients: int, charge: bool) -> tuple[int, dict, int]:
    async def main() -> tuple[int, dict]:
        srv, addr = await _serve(handler)
        m = Meter(MeterConfig(listen="127.0.0.1:0", upstream=addr, ledger=f"sqlite:///{tmp_path}/l.db", cap=10**6,
                              timing_charge=charge))
        await m.start()
        got = 0
        for _ in range(clients):
            got += await _read_all(m.listen_address)
        await asyncio.sleep(0.2)
        st = m.status()
        await m.stop()
        srv.close()
        return got, st

    got, st = asyncio.run(main())
    led = open_ledger(f"sqlite:///{tmp_path}/l.db", create=False)
    used = reads.status(led).used_bytes
    led.close()
    return got, st, used


async def _close_at_once(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.close()  # a connection closed without a byte: its timing is the only signal


async def _trickle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    for _ in range(10):  # ten 1-byte writes, apart: ten reads the inside timed
        w.write(b"x")
        await w.drain()
        await asyncio.sleep(0.03)
    w.close()


@pytest.mark.parametrize("charge", [True, False])
def test_open_and_close_are_charged(tmp_path, charge):
    got, st, used = _run(tmp_path, _close_at_once, 5, charge)
    assert got == 0
    per = OPEN_CHARGE + CLOSE_CHARGE if charge else 0
    assert st["timing_charged_bytes"] == 5 * per
    assert used == 5 * per  # settled at close: the ledger counts exactly the charges


def test_short_reads_are_charged_as_event_min(tmp_path):
    got, st, used = _run(tmp_path, _trickle, 1, True)
    assert got == 10 and st["bytes_out"] == 10
    assert used == got + st["timing_charged_bytes"]  # every charge is in the ledger, nothing else
    # each read of n < EVENT_MIN bytes counts EVENT_MIN: at least one read, at most ten
    assert OPEN_CHARGE + CLOSE_CHARGE <= st["timing_charged_bytes"] <= OPEN_CHARGE + CLOSE_CHARGE + 10 * (EVENT_MIN - 1)
