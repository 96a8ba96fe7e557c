"""Kill-switch latency: how long after a fault to the ledger a connection stops getting bytes, and
whether a kill -9 right after loses any count.

    .venv/bin/python bench/killswitch_bench.py [--runs 5] [--block 10000000] [--faults all]

Faults (tests/meter/meterkit.py FILE_FAULTS, on a SQLite ledger): chmod-db (`chmod a-w ledger.db`),
chmod-wal, chmod-dir, rm-wal, rm-shm, replace-wal, replace-db; and pg-restart (a PostgreSQL ledger
whose server is restarted: `pg_ctl restart -m immediate`, a throwaway cluster from tests/pgserver.py).
A real `exfilguard meter` subprocess, an echo upstream; the client echoes 1000-byte messages as fast as
it can, holding one large block (so only the probe or a file check can stop it), applies the fault and
times the cut; then the meter is killed (SIGKILL) and the ledger reopened: "under" is the bytes the
client received beyond what the ledger counts (0 is the goal; replace-db is a rollback, which the
published signed heads catch, so it is printed but not a goal). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "meter"))
sys.path.insert(0, str(ROOT / "tests"))

from meterkit import FILE_FAULTS, MeterProcess, Upstream  # noqa: E402

from exfilguard.ledger import open_ledger  # noqa: E402
from exfilguard.ledger import reads


async def one(port: int, fault) -> tuple[float, int, int]:
    """Echo, fault, echo until cut: (seconds to the cut, bytes after the fault, bytes in all)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    msg = b"x" * 1000
    got = 0
    for _ in range(20):
        w.write(msg)
        got += len(await r.readexactly(len(msg)))
    fault()
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
    return dt, after, got + after


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--block", type=int, default=10_000_000)
    ap.add_argument("--faults", default="all", help=f"comma list of {', '.join([*FILE_FAULTS, 'pg-restart'])}, or all")
    a = ap.parse_args()
    faults = [*FILE_FAULTS, "pg-restart"] if a.faults == "all" else a.faults.split(",")
    echo = Upstream("echo")
    pg = None
    with tempfile.TemporaryDirectory() as tmp:
        for fault in faults:
            times, bytes_after, under = [], [], []
            for i in range(a.runs):
                d = Path(tmp) / f"{fault}-{i}"
                d.mkdir()
                path = d / "ledger.db"
                if fault == "pg-restart":
                    if pg is None:
                        from pgserver import start_pg

                        pg = start_pg()
                    url = pg.create_db()
                    def restart(pg=pg) -> None:
                        pg._run("pg_ctl", "-D", str(pg.data), "-m", "immediate", "-w", "-t", "60", "restart",
                                "-l", str(pg.root / "log"),  # the server's output not on our pipe
                                "-o", f"-p {pg.port} -k {pg.sock} -c listen_addresses=127.0.0.1 -c fsync=on")

                    # in a thread: the clock runs from the restart's start, the server dies at once (immediate)
                    box: list[threading.Thread] = []
                    do = lambda: box.append(threading.Thread(target=restart)) or box[-1].start()  # noqa: E731
                    undo = lambda: [t.join() for t in box]  # noqa: E731
                else:
                    url = f"sqlite:///{path}"
                    f_do, f_undo = FILE_FAULTS[fault]
                    do, undo = (lambda f=f_do: f(path)), (lambda f=f_undo: f(path))
                # the first block is already --block: only the probe or a file check can stop the connection
                m = MeterProcess(d, url, echo.addr, 10**9, "--min-block", str(a.block), block=a.block)
                try:
                    m.wait_ready()
                    dt, after, total = asyncio.run(one(m.port, do))
                    m.kill()
                finally:
                    undo()
                    m.stop()
                led = open_ledger(url, create=False)
                reserved = reads.status(led, "default").reserved_bytes
                led.close()
                times.append(dt)
                bytes_after.append(after)
                under.append(max(0, total - reserved))
            print(f"{fault:12s} block {a.block} B, {a.runs} runs: fault to cut median {statistics.median(times) * 1000:.0f} ms, "
                  f"max {max(times) * 1000:.0f} ms; bytes echoed after the fault: median {statistics.median(bytes_after):.0f}, "
                  f"max {max(bytes_after)}; under-counted after kill -9: max {max(under)} B", flush=True)
    echo.close()
    if pg is not None:
        pg.destroy()


if __name__ == "__main__":
    main()
