"""The proxy in-process: bytes pass intact, the cap is exact, windows hold, stop settles, /status."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from meterkit import Upstream, pull, pull_many

from exfilguard.ledger import open_ledger
from exfilguard.ledger import reads
from exfilguard.ledger.keytools import generate_keypair, load_public_key
from exfilguard.ledger.verify import verify_ledger
from exfilguard.ledger.events import decode_event
from exfilguard.meter import Meter, MeterConfig
from exfilguard.ledger.reads import budget_status
from exfilguard.units import parse_window


@pytest.fixture
def flood():
    up = Upstream("flood")
    yield up
    up.close()


@pytest.fixture
def echo():
    up = Upstream("echo")
    yield up
    up.close()


def _cfg(tmp_path, upstream, **kw) -> MeterConfig:
    base = dict(listen="127.0.0.1:0", upstream=upstream, ledger=f"sqlite:///{tmp_path}/ledger.db", cap=10**9,
                metrics="127.0.0.1:0")
    base.update(kw)
    return MeterConfig(**base)


async def _http(addr, path: str) -> tuple[str, bytes]:
    r, w = await asyncio.open_connection(*addr)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw = await r.read()
    w.close()
    head, body = raw.split(b"\r\n\r\n", 1)
    return head.decode().split("\r\n")[0], body


def _kinds(url: str) -> list[str]:
    return [decode_event(e)["kind"] for _, e in reads.entries(open_ledger(url, create=False))]


def test_bytes_pass_intact_and_are_counted(tmp_path, echo):
    payload = os.urandom(300_000)
    cfg = _cfg(tmp_path, echo.addr, reserve_block=4096)

    async def main():
        m = Meter(cfg)
        await m.start()
        r, w = await asyncio.open_connection(*m.listen_address)
        w.write(payload)
        got = await r.readexactly(len(payload))
        w.close()
        await asyncio.sleep(0.2)
        st = m.status()
        await m.stop()
        return got, st

    got, st = asyncio.run(main())
    assert got == payload
    assert st["bytes_in"] == st["bytes_out"] == len(payload)
    led = open_ledger(cfg.ledger, create=False)
    s = reads.status(led)
    assert s.reserved_bytes == len(payload) and s.outstanding_bytes == 0
    assert verify_ledger(led).ok


def test_the_connection_that_reaches_the_cap_gets_exactly_what_fits(tmp_path, flood):
    cfg = _cfg(tmp_path, flood.addr, cap=100_003, reserve_block=4096)

    async def main():
        m = Meter(cfg)
        await m.start()
        first = await pull(*m.listen_address)
        second = await pull(*m.listen_address)
        status = json.loads((await _http(m.metrics_address, "/status"))[1])
        metrics = (await _http(m.metrics_address, "/metrics"))[1].decode()
        await m.stop()
        return first, second, status, metrics

    first, second, status, metrics = asyncio.run(main())
    assert (first, second) == (100_003, 0)
    assert status["state"] == "exhausted" and status["remaining_bytes"] == 0
    assert "exfilguard_meter_bytes_out_total 100003.0" in metrics
    assert 'exfilguard_meter_denials_total{reason="cap"} 2.0' in metrics
    assert "exfilguard_meter_ledger_commit_seconds_count" in metrics
    assert _kinds(cfg.ledger).count("deny") == 2
    assert budget_status(cfg.ledger).remaining_bytes == 0


def test_rolling_window_caps_the_rate(tmp_path, flood):
    cfg = _cfg(tmp_path, flood.addr, cap=10**7, windows=(parse_window("1h=100000"),), reserve_block=8192)

    async def main():
        m = Meter(cfg)
        await m.start()
        got = await pull_many(*m.listen_address, 1)
        got += await pull_many(*m.listen_address, 5)
        st = m.status()
        await m.stop()
        return got, st

    got, st = asyncio.run(main())
    assert got[0] == 100_000 and sum(got) == 100_000
    assert st["state"] == "exhausted"
    assert budget_status(cfg.ledger).windows[0]["remaining_bytes"] == 0
    assert verify_ledger(open_ledger(cfg.ledger, create=False)).ok


def test_stop_settles_open_connections_and_signs_the_head(tmp_path, echo):
    priv, pub = generate_keypair(tmp_path / "meter.key")
    cfg = _cfg(tmp_path, echo.addr, signing_key=priv, sth_interval=0.2)

    async def main():
        m = Meter(cfg)
        await m.start()
        r, w = await asyncio.open_connection(*m.listen_address)
        w.write(b"hello")
        assert await r.readexactly(5) == b"hello"
        await asyncio.sleep(0.5)  # a periodic head is signed meanwhile
        await m.stop()  # the connection is still open
        assert await r.read() == b""

    asyncio.run(main())
    led = open_ledger(cfg.ledger, create=False)
    st = reads.status(led)
    assert st.reserved_bytes == 5 and st.outstanding_bytes == 0
    rep = verify_ledger(led, [load_public_key(pub)])
    assert rep.ok, rep.problems
    assert rep.signed_heads >= 2 and rep.unsigned_tail == 0
    kinds = _kinds(cfg.ledger)
    assert kinds[0] == "budget_created" and kinds[1] == "meter_start" and kinds[-1] == "meter_stop"
    assert "release" in kinds


def test_unsigned_heads_are_logged(tmp_path, echo, caplog):
    async def main():
        m = Meter(_cfg(tmp_path, echo.addr))
        await m.start()
        await m.stop()

    with caplog.at_level("WARNING", logger="exfilguard.meter"):
        asyncio.run(main())
    assert "tree heads are NOT signed" in caplog.text
