"""Crash: SIGKILL the meter at random moments during transfers, restart it, many rounds.

Every round: bytes received <= the ledger's reserved total; the ledger over-counts by at most
the bound docs/meter.md states: per connection open at the crash, two blocks of the ceiling
(`--reserve-block`) plus the meter's user-space socket buffer (WRITE_SLACK); over all rounds
bytes received <= cap.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from meterkit import MeterProcess, Upstream, pull

from exfilguard.ledger import open_ledger
from exfilguard.ledger import reads
from exfilguard.ledger.verify import verify_ledger
from exfilguard.meter.proxy import WRITE_SLACK  # the client write buffer's high-water mark + one read

CLIENTS = 4
BLOCK = 16384


def _crash_rounds(tmp_path, url: str, rounds: int, cap: int, seed: int, block: int = BLOCK) -> None:
    rng = random.Random(seed)
    flood = Upstream("flood")
    received = 0
    try:
        for rnd in range(rounds):
            m = MeterProcess(tmp_path, url, flood.addr, cap, block=block, name=f"crash{rnd}")
            try:
                m.wait_ready()
                delay = rng.choice([0.0, 0.02, rng.uniform(0.05, 0.8)])

                async def one_round() -> int:
                    tasks = [asyncio.create_task(pull("127.0.0.1", m.port, 30)) for _ in range(CLIENTS)]
                    await asyncio.sleep(delay)
                    m.kill()  # SIGKILL, mid-transfer
                    return sum(await asyncio.gather(*tasks))

                got = asyncio.run(one_round())
            finally:
                m.kill()
            received += got
            led = open_ledger(url, create=False)
            st = reads.status(led, "default")
            led.close()
            # Never under-counts, whatever the moment of the crash.
            assert received <= st.reserved_bytes, (rnd, received, st)
            # Over-counts by at most two blocks + the write slack per connection open at each crash.
            assert st.reserved_bytes - received <= (rnd + 1) * CLIENTS * (2 * block + WRITE_SLACK), (rnd, received, st)
            # Open reservations left: a drained one awaiting settlement, the current and the next.
            assert st.outstanding_bytes <= (rnd + 1) * CLIENTS * 3 * block
            assert received <= cap
            print(f"round {rnd}: delay {delay:.3f}s, got {got}, received {received}, reserved {st.reserved_bytes}, open {st.outstanding_bytes}")
        # A last, clean run drains what is left: the cap holds across all the restarts.
        m = MeterProcess(tmp_path, url, flood.addr, cap, block=block, name="final")
        try:
            m.wait_ready()

            async def drain() -> int:
                total = 0
                while True:
                    got = sum(await asyncio.gather(*[pull("127.0.0.1", m.port, 60) for _ in range(CLIENTS)]))
                    total += got
                    if got == 0:
                        return total

            received += asyncio.run(drain())
        finally:
            assert m.stop() == 0, m.log()[-3000:]
    finally:
        flood.close()
    led = open_ledger(url, create=False)
    st = reads.status(led, "default")
    assert received <= cap
    assert st.remaining_bytes == 0 and st.reserved_bytes == cap
    rep = verify_ledger(led)
    assert rep.ok, rep.problems  # a kill -9 never leaves a half-written entry


def test_crash_sqlite(tmp_path):
    _crash_rounds(tmp_path, f"sqlite:///{tmp_path}/ledger.db", rounds=14, cap=8_000_000, seed=20240917)


def test_crash_sqlite_adaptive_blocks(tmp_path):
    """Blocks that grow from 4 KiB to a 1 MiB ceiling while the clients pull flat out."""
    _crash_rounds(tmp_path, f"sqlite:///{tmp_path}/ledger.db", rounds=6, cap=150_000_000, seed=11, block=1 << 20)


@pytest.mark.postgres
def test_crash_postgres(tmp_path, pg_url):
    _crash_rounds(tmp_path, pg_url, rounds=8, cap=1_500_000, seed=7)


@pytest.mark.postgres
def test_crash_postgres_adaptive_blocks(tmp_path, pg_url):
    _crash_rounds(tmp_path, pg_url, rounds=4, cap=60_000_000, seed=5, block=1 << 20)
