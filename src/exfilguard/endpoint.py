"""Where a server listens or a peer is reached: HOST:PORT or unix:PATH; and the wait for SIGINT/SIGTERM
that every long-running command ends in. Shared by the inside's and the outside's entry points, so
neither imports the other."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from exfilguard.errors import ConfigError


@dataclass(frozen=True)
class Endpoint:
    """A TCP address (host, port) or a UNIX socket (path)."""

    host: str = "127.0.0.1"
    port: int = 0
    path: str | None = None

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else f"{self.host}:{self.port}"


def parse_endpoint(text: str, default_host: str = "127.0.0.1") -> Endpoint:
    """'unix:PATH', 'HOST:PORT', ':PORT' or 'PORT' -> Endpoint; ConfigError otherwise."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise ConfigError(f"expected unix:PATH, got {text!r}")
        return Endpoint(path=path)
    host, port = parse_hostport(text, default_host)
    return Endpoint(host, port)


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'HOST:PORT' or ':PORT' or 'PORT' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"expected HOST:PORT, got {text!r}") from None
    if not 0 <= p < 65536:
        raise ConfigError(f"port out of range in {text!r}")
    return host.strip("[]") or default_host, p


async def wait_for_signal() -> None:
    """Return when SIGINT or SIGTERM arrives."""
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
