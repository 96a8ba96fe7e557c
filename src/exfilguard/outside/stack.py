"""Run the pieces: the inside worker, the outside API, and all three with a meter (`up`).

The CLI calls these; tests and the benchmark start the same stacks in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from exfilguard.outside.app import OutsideConfig, create_app
from exfilguard.outside.client import InsideConnection, StatusProbe, no_probe
from exfilguard.protocol.streams import CodecFactory

log = logging.getLogger(__name__)


def parse_hostport(s: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'HOST:PORT' or ':PORT' or 'PORT' -> (host, port)."""
    from exfilguard.errors import ConfigError

    host, sep, port = s.rpartition(":")
    if not sep:
        host, port = "", s
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"expected HOST:PORT, got {s!r}") from None
    if not 0 <= p < 65536:
        raise ConfigError(f"port out of range in {s!r}")
    return host or default_host, p


def make_backend(strong: Any, max_batch: int = 64) -> Any:
    """The backend for a loaded strong model: continuous batching for transformers models."""
    from exfilguard.inside.engine import LocalEngine

    return LocalEngine(strong, max_batch=max_batch)


async def start_inside(backend: Any, codecs: CodecFactory, tokenizer: Any, vocab_size: int | None,
                       host: str = "127.0.0.1", port: int = 0) -> Any:
    """Start an InsideServer; return it (its `.port` is the bound port)."""
    from exfilguard.inside.server import InsideConfig, InsideServer

    srv = InsideServer(backend, codecs, tokenizer, vocab_size, InsideConfig(host=host, port=port))
    srv.port = await srv.start()
    return srv


class UvicornThreadless:
    """A uvicorn server run as a task in the current event loop."""

    def __init__(self, app: Any, host: str, port: int):
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(self.config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("uvicorn stopped during startup")
            await asyncio.sleep(0.02)
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 10)


async def start_outside(codecs: CodecFactory, tokenizer: Any, weak_fingerprint: str, api_keys: list[str],
                        inside_host: str, inside_port: int, probe: StatusProbe = no_probe,
                        host: str = "127.0.0.1", port: int = 0, config: OutsideConfig | None = None) -> tuple[UvicornThreadless, int]:
    """Start the API; return (server, bound port)."""
    conn = InsideConnection(inside_host, inside_port, codecs, probe)
    app = create_app(conn, tokenizer, weak_fingerprint, api_keys, config)
    srv = UvicornThreadless(app, host, port)
    return srv, await srv.start()


@dataclass
class LoopThread:
    """An asyncio loop in a background thread, for running servers next to blocking code."""

    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self.loop.run_forever, name="exfilguard-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any], timeout: float | None = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self.thread is not None:
            self.thread.join(timeout=10)


MeterStarter = Callable[[int], Awaitable[tuple[int, StatusProbe, Callable[[], Awaitable[None]]]]]
