"""A tiny-random stack (inside + stand-in meter + outside) in one background loop."""

from __future__ import annotations

import asyncio

import pytest

from exfilguard.protocol.codec_adapter import RealCodecFactory

KEY = "sk-test-key"


class StandInMeter:
    """A counting TCP proxy with a cap on inside->outside bytes (until the real meter lands)."""

    def __init__(self, upstream_port: int, cap: int) -> None:
        self.upstream_port, self.cap, self.used = upstream_port, cap, 0
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def status(self) -> str:
        if self.server is None or not self.server.is_serving():
            return "down"
        return "exhausted" if self.used >= self.cap else "ok"

    async def _conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self.used >= self.cap:
            cw.close()
            return
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers += [cw, uw]

        async def down() -> None:
            while data := await cr.read(65536):
                uw.write(data)
            uw.close()

        async def up() -> None:
            while data := await ur.read(65536):
                room = self.cap - self.used
                take = data[: max(room, 0)]
                self.used += len(take)
                cw.write(take)
                await cw.drain()
                if len(take) < len(data) or self.used >= self.cap:
                    break
            cw.close()
            uw.close()

        await asyncio.gather(down(), up(), return_exceptions=True)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()


class TinyStack:
    def __init__(self, cap: int = 10**9, flush_every: int = 4, outside_fingerprint: str | None = None) -> None:
        from exfilguard.models import load_model
        from exfilguard.outside.app import OutsideConfig
        from exfilguard.outside.stack import LoopThread, make_backend, start_inside, start_outside

        self.model = load_model("tiny-random")
        tok = self.model.tokenizer
        fp = self.model.info.fingerprint
        self.codecs = RealCodecFactory(self.model)
        self.lt = LoopThread()
        self.inside = self.lt.run(start_inside(make_backend(self.model), self.codecs, tok, self.model.info.vocab_size))
        self.meter = StandInMeter(self.inside.port, cap)
        mport = self.lt.run(self.meter.start())
        cfg = OutsideConfig(model_name="tiny-random", flush_every=flush_every, default_max_tokens=16)
        self.outside, self.port = self.lt.run(
            start_outside(self.codecs, tok, outside_fingerprint or fp, [KEY], "127.0.0.1", mport, self.meter.status, config=cfg)
        )
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = KEY):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=60)

    def close(self) -> None:
        self.lt.run(self.outside.stop())
        self.lt.run(self.meter.stop())
        self.lt.run(self.inside.stop())
        self.lt.close()


@pytest.fixture(scope="module")
def tiny_stack():
    s = TinyStack()
    yield s
    s.close()
