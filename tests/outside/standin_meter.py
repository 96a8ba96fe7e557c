"""A stand-in for the meter in unit tests: a counting TCP proxy with a cap on inside->outside bytes."""

from __future__ import annotations

import asyncio


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
