"""The meter process on either event loop: same exact cap, and /status says which loop runs."""

from __future__ import annotations

import asyncio

import pytest
from meterkit import MeterProcess, Upstream, get_status, pull_many

from exfilguard.ledger import open_ledger
from exfilguard.ledger import reads
from exfilguard.ledger.verify import verify_ledger


@pytest.mark.parametrize("loop", ["asyncio", "uvloop", "auto"])
def test_cap_is_exact_on_each_loop(tmp_path, loop):
    flood = Upstream("flood")
    url = f"sqlite:///{tmp_path}/ledger.db"
    m = MeterProcess(tmp_path, url, flood.addr, 300_007, "--loop", loop, "--min-block", "1KiB", block=64 << 10)
    try:
        st = m.wait_ready()
        got = asyncio.run(pull_many("127.0.0.1", m.port, 8))
        after = get_status(m.metrics_port)
    finally:
        m.stop()
        flood.close()
    assert st["loop"] == ("asyncio" if loop == "asyncio" else "uvloop")
    assert sum(got) == 300_007 and after["bytes_out"] == 300_007
    led = open_ledger(url, create=False)
    assert reads.status(led, "default").reserved_bytes == 300_007
    assert verify_ledger(led).ok
