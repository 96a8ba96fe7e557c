"""Meter benchmark: throughput through the meter vs a direct loopback connection, and the
latency the meter adds to a small chunk, with SQLite and PostgreSQL, at 1 and 50 connections.

    .venv/bin/python bench/meter_bench.py [--seconds 3] [--pg-url URL] [--block 65536]

Without --pg-url a throwaway PostgreSQL cluster is started (tests/pgserver.py). The meter runs
as a real `exfilguard meter` subprocess, the upstream as another process; this process runs
the clients. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

UPSTREAM = r"""
import asyncio, sys
CHUNK = b"\xab" * 65536
SMALL = b"s" * int(sys.argv[3])
async def flood(r, w):
    try:
        while True:
            w.write(CHUNK); await w.drain()
    except Exception: pass
async def ping(r, w):
    try:
        while await r.read(1):
            w.write(SMALL); await w.drain()
    except Exception: pass
async def main():
    a = await asyncio.start_server(flood, "127.0.0.1", int(sys.argv[1]), backlog=512)
    b = await asyncio.start_server(ping, "127.0.0.1", int(sys.argv[2]), backlog=512)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def throughput(port: int, conns: int, seconds: float) -> float:
    """Bytes per second received by `conns` clients reading flat out for `seconds`."""
    total = 0
    stop = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal total
        r, w = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop:
            b = await r.read(1 << 20)
            if not b:
                break
            total += len(b)
        w.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[one() for _ in range(conns)])
    return total / (time.perf_counter() - t0)


async def chunk_latency(port: int, conns: int, n: int, size: int) -> list[float]:
    """Round-trip times (seconds) of a 1-byte request answered by one `size`-byte chunk."""
    out: list[float] = []

    async def one() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(5):  # warm up: the first chunk waits for the connection's reservation
            w.write(b"?")
            await r.readexactly(size)
        for _ in range(n):
            t0 = time.perf_counter()
            w.write(b"?")
            await r.readexactly(size)
            out.append(time.perf_counter() - t0)
        w.close()

    await asyncio.gather(*[one() for _ in range(conns)])
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def start_meter(ledger: str, upstream_port: int, block: int, tmp: Path) -> tuple[subprocess.Popen, int, int]:
    port, mport = free_port(), free_port()
    log = open(tmp / f"meter-{port}.log", "w")
    p = subprocess.Popen(
        [sys.executable, "-m", "exfilguard.cli.main", "meter", "--listen", f"127.0.0.1:{port}",
         "--upstream", f"127.0.0.1:{upstream_port}", "--ledger", ledger, "--cap", str(10**15),
         "--reserve-block", str(block), "--metrics", f"127.0.0.1:{mport}", "--log-level", "WARNING"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/status", timeout=1) as r:
                if json.loads(r.read())["state"] == "ok":
                    return p, port, mport
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("meter did not start")


def commit_histogram(mport: int) -> tuple[float, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2) as r:
        text = r.read().decode()
    s = c = 0.0
    for line in text.splitlines():
        if line.startswith("exfilguard_meter_ledger_commit_seconds_sum"):
            s = float(line.split()[-1])
        if line.startswith("exfilguard_meter_ledger_commit_seconds_count"):
            c = float(line.split()[-1])
    return s, c


def reserve_cost(url: str, n: int = 200) -> tuple[float, float]:
    """p50, p99 of one reserve() commit, straight on the ledger (ms)."""
    from exfilguard.ledger import open_ledger

    led = open_ledger(url)
    led.ensure_budget("bench-commit", 10**15)
    ts = []
    for i in range(n):
        t0 = time.perf_counter()
        led.reserve("bench-commit", 65536, "bench", i)
        ts.append(time.perf_counter() - t0)
    led.close()
    return pct(ts, 50) * 1e3, pct(ts, 99) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--block", type=int, default=65536, help="reservation block for the throughput runs")
    ap.add_argument("--extra-blocks", default="1048576", help="comma-separated larger blocks to show the scaling ('' for none)")
    ap.add_argument("--chunk", type=int, default=200, help="small chunk size in bytes")
    ap.add_argument("--pings", type=int, default=2000, help="small chunks per connection (1 conn); /10 at 50")
    ap.add_argument("--pg-url", default=None)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="meter-bench-"))
    fport, pport = free_port(), free_port()
    up = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(fport), str(pport), str(args.chunk)], stdout=subprocess.PIPE)
    assert up.stdout is not None and up.stdout.readline().strip() == b"ready"
    pg = None
    pg_url = args.pg_url
    if pg_url is None:
        from pgserver import start_pg

        pg = start_pg()
        pg_url = pg.create_db("meter_bench")
    print(f"# exfilguard meter benchmark: block {args.block} B, small chunk {args.chunk} B, "
          f"{args.seconds:g}s per throughput run, {os.cpu_count()} CPUs")
    rows = []
    scaling: list[tuple[str, int, int, float]] = []
    extra = [int(b) for b in args.extra_blocks.split(",") if b.strip()]
    try:
        direct = {c: asyncio.run(throughput(fport, c, args.seconds)) for c in (1, 50)}
        direct_lat = {c: asyncio.run(chunk_latency(pport, c, args.pings if c == 1 else args.pings // 10, args.chunk)) for c in (1, 50)}
        for name, url in (("sqlite", f"sqlite:///{tmp}/bench.db"), ("postgresql", pg_url)):
            p50c, p99c = reserve_cost(url)
            for c in (1, 50):
                for block in extra:
                    meter, port, mport = start_meter(url, fport, block, tmp)
                    try:
                        scaling.append((name, c, block, asyncio.run(throughput(port, c, args.seconds)) / direct[c]))
                    finally:
                        meter.terminate()
                        meter.wait(30)
                meter, port, mport = start_meter(url, fport, args.block, tmp)
                try:
                    s0, n0 = commit_histogram(mport)
                    thr = asyncio.run(throughput(port, c, args.seconds))
                    s1, n1 = commit_histogram(mport)
                finally:
                    meter.terminate()
                    meter.wait(30)
                # Latency "when no new reservation is needed": a block big enough for the whole run,
                # so every timed chunk is forwarded out of a reservation already committed.
                meter, port, mport = start_meter(url, pport, 1 << 30, tmp)
                try:
                    lat = asyncio.run(chunk_latency(port, c, args.pings if c == 1 else args.pings // 10, args.chunk))
                finally:
                    meter.terminate()
                    meter.wait(30)
                d = direct_lat[c]
                rows.append({
                    "ledger": name, "conns": c,
                    "direct_MBps": direct[c] / 1e6, "meter_MBps": thr / 1e6, "ratio": thr / direct[c],
                    "added_p50_ms": (pct(lat, 50) - pct(d, 50)) * 1e3,
                    "added_p99_ms": (pct(lat, 99) - pct(d, 99)) * 1e3,
                    "meter_p50_ms": pct(lat, 50) * 1e3, "meter_p99_ms": pct(lat, 99) * 1e3,
                    "direct_p50_ms": pct(d, 50) * 1e3, "direct_p99_ms": pct(d, 99) * 1e3,
                    "commits": int(n1 - n0), "commit_mean_ms": (s1 - s0) / max(1, n1 - n0) * 1e3,
                    "reserve_p50_ms": p50c, "reserve_p99_ms": p99c,
                })
    finally:
        up.terminate()
        if pg is not None:
            pg.destroy()
    print(f"{'ledger':<11}{'conns':>5} {'direct MB/s':>11} {'meter MB/s':>10} {'ratio':>6} "
          f"{'added p50 ms':>12} {'added p99 ms':>12} {'group commits':>13} {'commit ms':>9} {'reserve p50/p99 ms':>18}")
    for r in rows:
        print(f"{r['ledger']:<11}{r['conns']:>5} {r['direct_MBps']:>11.1f} {r['meter_MBps']:>10.1f} {r['ratio']:>6.2f} "
              f"{r['added_p50_ms']:>12.3f} {r['added_p99_ms']:>12.3f} {r['commits']:>13} {r['commit_mean_ms']:>9.2f} "
              f"{r['reserve_p50_ms']:>8.2f}/{r['reserve_p99_ms']:.2f}")
    for name, c, block, ratio in scaling:
        print(f"throughput ratio with --reserve-block {block}: {name}, {c} conns: {ratio:.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
