"""Race: 50 clients pulling from a flooding upstream race for the last bytes of a budget."""

from __future__ import annotations

import asyncio

import pytest
from meterkit import MeterProcess, Upstream, pull_many

from exfilguard.ledger import open_ledger
from exfilguard.ledger import reads
from exfilguard.ledger.verify import verify_ledger
from exfilguard.meter import Meter, MeterConfig

CLIENTS = 50


@pytest.fixture
def flood():
    up = Upstream("flood")
    yield up
    up.close()


def _run_in_process(url: str, flood: Upstream, cap: int, block: int) -> list[int]:
    async def main() -> list[int]:
        m = Meter(MeterConfig(listen="127.0.0.1:0", upstream=flood.addr, ledger=url, cap=cap, reserve_block=block))
        await m.start()
        try:
            got = await pull_many(*m.listen_address, CLIENTS)
            # A late client after the cap is reached gets nothing.
            got += await pull_many(*m.listen_address, 3)
        finally:
            await m.stop()
        return got

    return asyncio.run(main())


def _check_ledger(url: str, got: list[int], cap: int) -> None:
    led = open_ledger(url, create=False)
    st = reads.status(led, "default")
    # Every connection closed cleanly: the ledger's count is exactly what the clients received.
    assert st.reserved_bytes == sum(got) <= cap
    assert st.outstanding_bytes == 0
    rep = verify_ledger(led)
    assert rep.ok, rep.problems
    led.close()


@pytest.mark.parametrize("cap,block", [(1_000_003, 16384), (3_000_000, 65536)])
def test_race_sqlite(tmp_path, flood, cap, block):
    url = f"sqlite:///{tmp_path}/ledger.db"
    got = _run_in_process(url, flood, cap, block)
    assert sum(got) <= cap
    assert sum(got) > cap - CLIENTS * block  # the budget was really raced for, not starved
    assert got[-3:] == [0, 0, 0] or sum(got) < cap
    _check_ledger(url, got, cap)


@pytest.mark.postgres
def test_race_postgres(pg_url, flood):
    cap, block = 1_500_001, 16384
    got = _run_in_process(pg_url, flood, cap, block)
    assert sum(got) <= cap
    _check_ledger(pg_url, got, cap)


@pytest.mark.postgres
def test_race_two_meter_processes_share_one_postgres_budget(tmp_path, pg_url, flood):
    cap, block = 2_000_017, 16384
    meters = [MeterProcess(tmp_path, pg_url, flood.addr, cap, block=block, name=f"m{i}") for i in range(2)]
    try:
        for m in meters:
            m.wait_ready()

        async def main() -> list[int]:
            half = CLIENTS // 2
            parts = await asyncio.gather(*[pull_many("127.0.0.1", m.port, half) for m in meters])
            return [n for p in parts for n in p]

        got = asyncio.run(main())
    finally:
        codes = [m.stop() for m in meters]
    assert codes == [0, 0], [m.log()[-2000:] for m in meters]
    assert sum(got) <= cap
    _check_ledger(pg_url, got, cap)
    assert all("exhausted" in m.log() for m in meters)
