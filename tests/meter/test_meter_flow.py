"""Flow control: a client that stops reading stops the meter reading from the upstream.

The meter counts a byte when it hands it to the client's transport, so without back-pressure a
stalled client would let the count (and the meter's memory) run ahead of what the client can
take. On either event loop: the count stops growing while the client does not read, the meter's
user-space buffer stays within WRITE_SLACK, and once the client reads again it gets exactly the
cap, which is exactly what the ledger counts.
"""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from meterkit import Upstream

from exfilguard.ledger import open_ledger
from exfilguard.ledger import reads
from exfilguard.ledger.verify import verify_ledger
from exfilguard.meter import Meter, MeterConfig
from exfilguard.meter.proxy import READ_SIZE, WRITE_SLACK

CAP = 40_000_007


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_stalled_client_pauses_the_upstream_and_the_count(tmp_path, loop):
    flood = Upstream("flood")
    url = f"sqlite:///{tmp_path}/ledger.db"
    cfg = MeterConfig(listen="127.0.0.1:0", upstream=flood.addr, ledger=url, cap=CAP, reserve_block=1 << 20)

    async def main():
        m = Meter(cfg)
        await m.start()
        try:
            r, w = await asyncio.open_connection(*m.listen_address)
            got = len(await r.readexactly(1000))
            await asyncio.sleep(1.0)  # not reading: kernel buffers fill, then the meter must pause
            stalled = m.status()["bytes_out"]
            (c,) = m._conns.values()
            buffered = c.client.get_write_buffer_size()
            await asyncio.sleep(1.0)
            still = m.status()["bytes_out"]
            waiting = sum(len(b) for b in c.backlog)  # read from the upstream, not yet forwarded
            while data := await r.read(1 << 20):
                got += len(data)
            w.close()
            await asyncio.sleep(0.3)
            return got, stalled, still, buffered, waiting, m.status()
        finally:
            await m.stop()

    try:
        got, stalled, still, buffered, waiting, status = (asyncio.run if loop == "asyncio" else uvloop.run)(main())
    finally:
        flood.close()
    assert stalled == still, "the meter kept counting bytes a stalled client did not take"
    assert stalled < CAP // 2  # it stopped at what the socket buffers hold, far from the cap
    assert buffered <= WRITE_SLACK
    assert waiting <= READ_SIZE, "the meter kept reading from the upstream for a stalled client"
    assert got == CAP == status["bytes_out"]
    led = open_ledger(url, create=False)
    st = reads.status(led, "default")
    assert st.reserved_bytes == CAP and st.outstanding_bytes == 0
    assert verify_ledger(led).ok
