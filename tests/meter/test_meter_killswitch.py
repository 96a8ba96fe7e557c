"""Finding 3 of issue 11: `chmod a-w ledger` stops traffic even on a connection in the middle of a large block."""

from __future__ import annotations

import asyncio
import os
import time

from meterkit import MeterProcess, Upstream, get_status, pull

from exfilguard.ledger import open_ledger
from exfilguard.ledger import reads


async def _echo_until_cut(port: int, rounds_before: int, during, bound: float) -> tuple[int, bool]:
    """Echo 1000-byte messages; after `rounds_before`, call during() and keep echoing until the meter cuts us.

    Returns (bytes received, cut within `bound` seconds)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    got = 0
    msg = b"x" * 1000
    for _ in range(rounds_before):
        w.write(msg)
        got += len(await r.readexactly(len(msg)))
    await asyncio.get_running_loop().run_in_executor(None, during)
    deadline = time.monotonic() + bound
    cut = False
    while time.monotonic() < deadline:
        try:
            w.write(msg)
            await w.drain()
            data = await asyncio.wait_for(r.read(len(msg)), 1.0)
        except TimeoutError:
            continue
        except (ConnectionError, OSError):
            cut = True
            break
        if not data:
            cut = True
            break
        got += len(data)
        await asyncio.sleep(0.05)
    w.close()
    return got, cut


def test_read_only_ledger_cuts_a_connection_mid_block(tmp_path):
    echo = Upstream("echo")
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    # A 10 MB block: this connection never needs another reservation while it echoes 1000-byte messages.
    m = MeterProcess(tmp_path, url, echo.addr, 10**9, block=10_000_000)
    try:
        m.wait_ready()
        got, cut = asyncio.run(_echo_until_cut(m.port, 5, lambda: os.chmod(path, 0o444), bound=15.0))
        assert cut, "the connection kept forwarding after the ledger was made read-only"
        st = get_status(m.metrics_port)
        assert st["state"] == "ledger_down" and "read-only" in st["ledger_error"]
        assert asyncio.run(pull("127.0.0.1", m.port, 10)) == 0  # new connections: nothing
        log = m.log()
        assert "LEDGER UNAVAILABLE, failing closed" in log
        led = open_ledger(url, create=False)
        assert got <= reads.status(led, "default").reserved_bytes  # never more out than reserved
        led.close()
    finally:
        os.chmod(path, 0o644)
        m.stop()
        echo.close()
