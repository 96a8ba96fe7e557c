"""Adaptive, pipelined reservations settled at rest: the ledger counts traffic, not blocks.

- At rest after small answers on open connections: ledger used - bytes forwarded <= one first
  block (4 KiB) per open connection, and `forwarded_bytes` equals the bytes forwarded.
- Settlement happens on idle (and only then: with a long --settle-idle the blocks stay counted).
- Blocks grow while a connection drains them fast and shrink when its traffic slows.
- Two meters on one PostgreSQL budget, 50 clients each with adaptive blocks: 0 bytes over the cap.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import socketserver
import subprocess
import sys
import threading
import time

import pytest
from meterkit import CHUNK, MeterProcess, Upstream, get_metrics, pull_many

from exfilguard.ledger import open_ledger
from exfilguard.ledger import reads
from exfilguard.ledger.verify import verify_ledger
from exfilguard.ledger.events import decode_event
from exfilguard.meter import Meter, MeterConfig
from exfilguard.units import parse_window
from exfilguard.meter.blocks import GROW_MAX, GROW_TARGET, next_size, stalled_size

FIRST = 4096


@pytest.fixture
def echo():
    up = Upstream("echo")
    yield up
    up.close()


@pytest.fixture
def flood():
    up = Upstream("flood")
    yield up
    up.close()


def _cfg(url: str, upstream: str, **kw) -> MeterConfig:
    base = {"listen": "127.0.0.1:0", "upstream": upstream, "ledger": url, "cap": 10**9, "metrics": "127.0.0.1:0",
            "health_interval": 0.1, "settle_idle": 0.3}
    base.update(kw)
    return MeterConfig(**base)


async def _until(pred, timeout: float = 20.0) -> None:
    """Poll pred() until it holds; fail (not hang) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.05)


async def _answers(conns, n: int, size: int) -> int:
    """Send `n` requests of `size` bytes on each connection; the echo answers each; return bytes received."""
    got = 0
    for _ in range(n):
        for r, w in conns:
            w.write(b"a" * size)
            got += len(await r.readexactly(size))
    return got


def _events(url: str) -> list[dict]:
    led = open_ledger(url, create=False)
    try:
        return [decode_event(e) for _, e in reads.entries(led)]
    finally:
        led.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(tmp_path, request) -> str:
    """A fresh SQLite ledger file or PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    return request.getfixturevalue("pg_url")


def test_at_rest_the_ledger_counts_what_was_forwarded(url, echo):
    """Three open connections, three 256-byte answers each, then idle: used - forwarded <= 4 KiB each."""
    conns_n, answers, size = 3, 3, 256
    cfg = _cfg(url, echo.addr, windows=(parse_window("1h=10MB"),))

    async def main():
        m = Meter(cfg)
        await m.start()
        try:
            conns = [await asyncio.open_connection(*m.listen_address) for _ in range(conns_n)]
            got = await _answers(conns, answers, size)
            # At rest: every connection settled and holds one fresh first block.
            await _until(lambda: all(c.settled and c.nxt is not None and c.nxt.done() for c in m._conns.values())
                         and m.status()["outstanding_bytes"] == conns_n * FIRST)
            led = open_ledger(url, create=False)
            st = reads.status(led)
            led.close()
            status = m.status()
            # The budget-wide gauges follow at the next health check.
            want = [f"exfilguard_meter_budget_forwarded_bytes {float(got)}",
                    f"exfilguard_meter_budget_outstanding_bytes {float(conns_n * FIRST)}"]
            await _until(lambda: all(w in m.metrics.render().decode() for w in want))
            metrics = m.metrics.render().decode()
            cli = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "exfilguard.cli.main", "ledger", "status", "--ledger", url, "--json"],
                capture_output=True, text=True, timeout=60, check=False)
            for _, w in conns:
                w.close()
        finally:
            await m.stop()
        return got, st, status, metrics, cli

    got, st, status, metrics, cli = asyncio.run(main())
    assert got == status["bytes_out"] == conns_n * answers * size
    assert st.used_bytes - got <= conns_n * FIRST
    assert st.forwarded_bytes == got  # every byte forwarded is settled
    assert st.outstanding_bytes == conns_n * FIRST  # what is left: one unused first block per open connection
    assert st.used_bytes == st.forwarded_bytes + st.outstanding_bytes
    # The window counts the traffic (plus the small blocks held), not whole reservations.
    assert st.windows[0]["used_bytes"] == got + conns_n * FIRST
    assert status["unforwarded_reserved_bytes"] == conns_n * FIRST
    assert f"exfilguard_meter_bytes_out_total {float(got)}" in metrics
    assert f"exfilguard_meter_budget_forwarded_bytes {float(got)}" in metrics
    assert f"exfilguard_meter_outstanding_bytes {float(conns_n * FIRST)}" in metrics
    assert f"exfilguard_meter_unforwarded_reserved_bytes {float(conns_n * FIRST)}" in metrics
    assert 'exfilguard_meter_settlements_total{reason="idle"}' in metrics
    assert cli.returncode == 0, cli.stderr
    js = json.loads(cli.stdout)
    assert js["forwarded_bytes"] == got and js["outstanding_bytes"] == conns_n * FIRST
    # After the stop everything settled: the ledger's count is exactly what was forwarded.
    led = open_ledger(url, create=False)
    end = reads.status(led)
    assert end.used_bytes == end.forwarded_bytes == got and end.outstanding_bytes == 0
    rep = verify_ledger(led)
    assert rep.ok, rep.problems
    led.close()


def test_settlement_happens_on_idle_and_only_then(tmp_path, echo):
    """With a long --settle-idle the blocks stay counted in full; after idle they settle, then traffic resumes."""

    def run(settle_idle: float) -> tuple[list[tuple[int, int, int]], int, int]:
        url = f"sqlite:///{tmp_path}/idle-{settle_idle}.db"
        cfg = _cfg(url, echo.addr, settle_idle=settle_idle)

        async def main():
            m = Meter(cfg)
            await m.start()
            try:
                conn = await asyncio.open_connection(*m.listen_address)
                got = await _answers([conn], 10, 1000)

                def status():
                    led = open_ledger(url, create=False)
                    try:
                        return reads.status(led)
                    finally:
                        led.close()

                if settle_idle < 10:  # wait (bounded) for the settlement
                    await _until(lambda: status().forwarded_bytes == got)
                else:  # the control: nothing may settle however long we wait
                    await asyncio.sleep(1.0)
                st = status()
                snap = (st.used_bytes, st.forwarded_bytes, st.outstanding_bytes)
                got += await _answers([conn], 10, 1000)  # the settled connection keeps working
                conn[1].close()
            finally:
                await m.stop()
            return snap, got

        snap, got = asyncio.run(main())
        return snap, got, reads.status(open_ledger(url, create=False)).used_bytes

    (used, fwd, out), got, end = run(0.3)
    assert fwd == 10_000 and used - fwd == out == FIRST  # settled at what it forwarded, one first block kept
    assert end == got == 20_000
    (used, fwd, out), got, end = run(3600.0)
    assert used - 10_000 > FIRST  # unsettled: the pipelined blocks count in full
    assert end == got == 20_000  # and a clean close settles them exactly


def test_next_block_size_rules():
    """The next block: what the drain rate uses in GROW_TARGET s, at most GROW_MAX x, within [first, ceiling]."""
    def size(used: int, secs: float, amount: int, ceiling: int = 1 << 20) -> int:
        return next_size(used, secs, FIRST, amount, 0.0, min(FIRST, ceiling), ceiling)

    assert size(FIRST // 2, 0.001, FIRST) == GROW_MAX * FIRST  # drained fast: grows, by GROW_MAX at most
    assert size(1 << 19, 0.001, 1 << 20) == 1 << 20  # never above the ceiling
    assert size(100_000, 1.0, 1 << 20) == int(100_000 * GROW_TARGET)  # traffic slowed: shrinks to its rate
    assert size(10, 10.0, 1 << 20) == FIRST  # never below the first block
    assert size(1000, 0.001, 1000, ceiling=1000) == 1000  # --reserve-block <= first: fixed
    assert stalled_size(FIRST, 1 << 20) == GROW_MAX * FIRST and stalled_size(1 << 19, 1 << 20) == 1 << 20


class _Server(socketserver.ThreadingTCPServer):
    """A threaded upstream whose accept queue holds every test connection (the default 5 drops some)."""

    request_queue_size = 256
    daemon_threads = True
    allow_reuse_address = True


class _BulkThenTrickle(socketserver.BaseRequestHandler):
    """Sends 6 MB flat out, then 1 KB every 5 ms (<= 200 KB/s) for >= 3.5 s, then closes."""

    def handle(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for _ in range(6_000_000 // len(CHUNK)):
                self.request.sendall(CHUNK)
            for _ in range(700):
                self.request.sendall(CHUNK[:1024])
                time.sleep(0.005)
        except OSError:
            pass


def test_blocks_grow_while_draining_fast_and_shrink_when_traffic_slows(tmp_path):
    srv = _Server(("127.0.0.1", 0), _BulkThenTrickle)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"sqlite:///{tmp_path}/ledger.db"
    ceiling = 256 * 1024
    cfg = _cfg(url, f"127.0.0.1:{srv.server_address[1]}", reserve_block=ceiling, settle_idle=30)

    async def main() -> int:
        m = Meter(cfg)
        await m.start()
        try:
            return (await pull_many(*m.listen_address, 1, timeout=120))[0]
        finally:
            await m.stop()

    try:
        got = asyncio.run(main())
    finally:
        srv.shutdown()
        srv.server_close()
    assert got == 6_000_000 // len(CHUNK) * len(CHUNK) + 700 * 1024
    sizes = [e["amount"] for e in _events(url) if e["kind"] == "reserve"]
    assert sizes[0] == FIRST
    # Grows step by step: at most GROW_MAX x per block, GROW_MAX**2 x after the pump waited for a commit.
    assert all(b <= GROW_MAX**2 * a for a, b in itertools.pairwise(sizes))
    assert len([s for s in sizes if s < ceiling]) >= 3
    assert max(sizes) == ceiling  # reached the ceiling while draining fast
    peak = sizes.index(ceiling)
    # ... and came down when traffic slowed (to ~50 KB: 200 KB/s x 0.25 s; the trickle outlasts the
    # two big blocks in flight when it starts, 700 KB > 2 x 256 KiB).
    assert sizes[-1] <= ceiling // 2 and min(sizes[peak:]) < ceiling // 2
    assert reads.status(open_ledger(url, create=False)).used_bytes == got


@pytest.mark.postgres
def test_two_meters_fifty_clients_each_race_one_postgres_budget_adaptive(tmp_path, pg_url, flood):
    """Default adaptive blocks (4 KiB up to 16 MiB): 0 bytes over the cap, none stranded."""
    cap = 40_000_037
    meters = [MeterProcess(tmp_path, pg_url, flood.addr, cap, block=16 << 20, name=f"m{i}") for i in range(2)]
    try:
        for m in meters:
            m.wait_ready()

        async def main() -> list[int]:
            parts = await asyncio.gather(*[pull_many("127.0.0.1", m.port, 50, timeout=120) for m in meters])
            return [n for p in parts for n in p]

        got = asyncio.run(main())
        metrics = [get_metrics(m.metrics_port) for m in meters]
    finally:
        codes = [m.stop() for m in meters]
    assert codes == [0, 0], [m.log()[-2000:] for m in meters]
    assert sum(got) == cap  # 0 bytes over; every byte granted was forwarded
    led = open_ledger(pg_url, create=False)
    st = reads.status(led, "default")
    assert st.reserved_bytes == st.forwarded_bytes == sum(got) and st.outstanding_bytes == 0
    rep = verify_ledger(led)
    assert rep.ok, rep.problems
    led.close()
    sizes = [e["amount"] for e in _events(pg_url) if e["kind"] == "reserve"]
    assert min(sizes) < FIRST + 1 and max(sizes) > 64 * 1024  # blocks really adapted
    assert all("exfilguard_meter_reservation_bytes_count" in t for t in metrics)


class _Bursts(socketserver.BaseRequestHandler):
    """Sends 16 KiB bursts with 30 ms pauses, forever: idle settlements race with the next burst."""

    def handle(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                self.request.sendall(CHUNK[:16384])
                time.sleep(0.03)
        except OSError:
            pass


def test_settlements_racing_bursts_keep_the_cap_and_the_count_exact(tmp_path):
    """--settle-idle 0.02 s against bursty traffic on 20 connections: settle, reserve and forward
    interleave all the time; the cap holds, and after the stop the ledger equals what was received."""
    srv = _Server(("127.0.0.1", 0), _Bursts)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"sqlite:///{tmp_path}/ledger.db"
    cap = 2_000_003
    cfg = _cfg(url, f"127.0.0.1:{srv.server_address[1]}", cap=cap, settle_idle=0.02)

    async def main() -> tuple[list[int], str]:
        m = Meter(cfg)
        await m.start()
        try:
            got = await pull_many(*m.listen_address, 20, timeout=120)
            return got, m.metrics.render().decode()
        finally:
            await m.stop()

    try:
        got, metrics = asyncio.run(main())
    finally:
        srv.shutdown()
        srv.server_close()
    led = open_ledger(url, create=False)
    st = reads.status(led)
    assert st.outstanding_bytes == 0
    # Every byte granted was forwarded, every byte returned by a settlement was granted again:
    # the connections raced to exactly the cap.
    assert sum(got) == st.reserved_bytes == st.forwarded_bytes == cap
    rep = verify_ledger(led)
    assert rep.ok, rep.problems
    led.close()
    idle = [ln for ln in metrics.splitlines() if ln.startswith('exfilguard_meter_settlements_total{reason="idle"}')]
    assert idle and float(idle[0].split()[-1]) >= 20  # settlements really interleaved with traffic
    partial = [e for e in _events(url) if e["kind"] == "release" and 0 < e["used"] < e["used"] + e["returned"]]
    assert partial  # some reservations settled part-used, the rest returned and granted again
