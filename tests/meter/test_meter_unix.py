"""The upstream may be a UNIX socket (unix:PATH): the cap holds as over TCP; a symlink is refused."""

from __future__ import annotations

import asyncio
import os

import pytest

from exfilguard.errors import ConfigError, UpstreamUnavailable
from exfilguard.ledger import open_ledger
from exfilguard.ledger import reads
from exfilguard.meter import Meter, MeterConfig
from exfilguard.meter.config import parse_upstream


def _cfg(tmp_path, upstream: str, **kw) -> MeterConfig:
    base = dict(listen="127.0.0.1:0", upstream=upstream, ledger=f"sqlite:///{tmp_path}/ledger.db", cap=100_003,
                reserve_block=4096, min_block=4096)
    base.update(kw)
    return MeterConfig(**base)


async def _flood_server(path: str) -> asyncio.base_events.Server:
    async def flood(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                w.write(b"x" * 65536)
                await w.drain()
        except (ConnectionError, OSError):
            pass

    return await asyncio.start_unix_server(flood, path)


async def _pull(addr) -> int:
    r, w = await asyncio.open_connection(*addr)
    n = 0
    while b := await r.read(1 << 16):
        n += len(b)
    w.close()
    return n


def test_parse_upstream():
    assert parse_upstream("unix:/run/x.sock") == "/run/x.sock"
    assert parse_upstream("127.0.0.1:80") == ("127.0.0.1", 80)
    with pytest.raises(ConfigError):
        parse_upstream("unix:")
    with pytest.raises(ConfigError):
        MeterConfig(listen="127.0.0.1:0", upstream="unix", ledger="sqlite:///x.db", cap=1).validate()


def test_cap_is_exact_over_a_unix_socket(tmp_path):
    sock = str(tmp_path / "inside.sock")
    cfg = _cfg(tmp_path, f"unix:{sock}")

    async def main() -> int:
        srv = await _flood_server(sock)
        m = Meter(cfg)
        await m.start()  # --upstream-wait connects to the socket too
        got = sum(await asyncio.gather(*[_pull(m.listen_address) for _ in range(3)]))
        await m.stop()
        srv.close()
        return got

    assert asyncio.run(main()) == 100_003
    assert reads.status(open_ledger(cfg.ledger, create=False)).reserved_bytes == 100_003


def test_a_symlink_in_place_of_the_socket_is_refused(tmp_path):
    sock, link = str(tmp_path / "real.sock"), str(tmp_path / "inside.sock")
    os.symlink(sock, link)

    async def main() -> tuple[int, str]:
        srv = await _flood_server(sock)
        with pytest.raises(UpstreamUnavailable, match="symlink"):
            await Meter(_cfg(tmp_path, f"unix:{link}", upstream_wait=0.3)).start()
        m = Meter(_cfg(tmp_path, f"unix:{link}", upstream_wait=0))
        await m.start()
        got = await _pull(m.listen_address)  # the connection is closed without a byte
        await m.stop()
        srv.close()
        return got, m.status()["state"]

    assert asyncio.run(main()) == (0, "stopping")
