"""Kill-switch latency: how long after `chmod a-w ledger.db` a connection that holds a large
block stops getting bytes, and how many bytes it got meanwhile.

    .venv/bin/python bench/killswitch_bench.py [--runs 5] [--block 10000000]

A real `exfilguard meter` subprocess (SQLite), an echo upstream; the client echoes 1000-byte
messages as fast as it can, chmods the ledger, and times the cut. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "meter"))

from meterkit import MeterProcess, Upstream


async def one(port: int, path: Path) -> tuple[float, int]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    msg = b"x" * 1000
    for _ in range(20):
        w.write(msg)
        await r.readexactly(len(msg))
    os.chmod(path, 0o444)
    t0 = time.perf_counter()
    after = 0
    try:
        while True:
            w.write(msg)
            await w.drain()
            data = await asyncio.wait_for(r.read(len(msg)), 30)
            if not data:
                break
            after += len(data)
    except (ConnectionError, OSError):
        pass
    dt = time.perf_counter() - t0
    w.close()
    return dt, after


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--block", type=int, default=10_000_000)
    a = ap.parse_args()
    echo = Upstream("echo")
    times, bytes_after = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            path = Path(tmp) / f"ledger{i}.db"
            m = MeterProcess(Path(tmp), f"sqlite:///{path}", echo.addr, 10**9, block=a.block)
            try:
                m.wait_ready()
                dt, after = asyncio.run(one(m.port, path))
                times.append(dt)
                bytes_after.append(after)
            finally:
                os.chmod(path, 0o644)
                m.stop()
    echo.close()
    print(f"block {a.block} B, {a.runs} runs: time from chmod to cut: "
          f"median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms; "
          f"bytes echoed after the chmod: median {statistics.median(bytes_after):.0f}, max {max(bytes_after)}")


if __name__ == "__main__":
    main()
