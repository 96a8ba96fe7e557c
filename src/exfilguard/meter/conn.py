"""What one proxied connection holds (its reservations, buffers and counters; proxy.py acts on it), and how it reaches the upstream."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exfilguard.ledger import Grant
from exfilguard.meter.config import parse_upstream, unix_socket


@dataclass
class _Res:
    """One committed reservation of a connection: `used` of its `amount` bytes forwarded so far."""

    id: int
    amount: int
    used: int = 0


@dataclass
class _Conn:
    """One proxied connection's accounting.

    It holds at most two open reservations it may still forward from: `cur` (being forwarded)
    and `nxt` (the next block, committing or committed while `cur` drains: pipelining). Blocks
    it drained completely wait in `spent` until the next ledger call of this connection settles
    them; they hold no unforwarded byte. Upstream bytes not yet written wait in `backlog`
    (not counted: they have not left).
    """

    id: int
    client: asyncio.Transport
    block: int = 0  # the size the next reservation asks for (adaptive, blocks.py)
    cur: _Res | None = None
    nxt: asyncio.Future[Grant] | None = None
    spent: list[_Res] = field(default_factory=list)
    cur_since: float = 0.0  # when cur became the block being forwarded (its drain rate)
    last_out: float = 0.0  # when the last byte was forwarded (idle settlement)
    settled: bool = True  # nothing forwarded since the connection last settled
    busy: bool = False  # the first block is awaited; the settler keeps off
    closing: bool = False
    bytes_out: int = 0
    bytes_in: int = 0
    owed: int = 0  # timing charges (blocks.py) not yet counted in a block: paid before the next byte
    reason: str = ""
    upstream: asyncio.Transport | None = None
    inbuf: list[bytes] = field(default_factory=list)  # client bytes read before the upstream connected
    backlog: collections.deque[bytes | memoryview] = field(default_factory=collections.deque)
    waiter: asyncio.Future[None] | None = None  # waits for the next block's commit; upstream paused
    client_full: bool = False  # the client's write buffer is above WRITE_HIGH; upstream paused
    upstream_done: bool = False  # the upstream closed; end once the backlog is out
    task: asyncio.Task[None] | None = None
    done: asyncio.Future[None] | None = None  # set when the connection is to end (made at accept)

    def granted_next(self) -> Grant | None:
        """The next block if its commit finished with a grant, else None."""
        if self.nxt is None or not self.nxt.done() or self.nxt.cancelled() or self.nxt.exception() is not None:
            return None
        g = self.nxt.result()
        return g if g.granted > 0 else None

    def holding(self) -> tuple[int, int]:
        """(bytes in open reservations, of which not forwarded): what a crash now would leave counted."""
        nxt = self.granted_next()
        held = sum(r.amount for r in self.spent) + (nxt.granted if nxt else 0)
        unfwd = nxt.granted if nxt else 0
        if self.cur is not None:
            held += self.cur.amount
            unfwd += self.cur.amount - self.cur.used
        return held, unfwd


class _Cut(Exception):
    """The budget has no bytes left for this connection."""


async def connect_upstream(upstream: str, protocol: Callable[[], asyncio.Protocol]) -> tuple[Any, Any]:
    """Open a connection to the upstream: HOST:PORT, or unix:PATH when PATH is a socket (not a symlink)."""
    loop, where = asyncio.get_running_loop(), parse_upstream(upstream)
    if isinstance(where, str):
        return await loop.create_unix_connection(protocol, unix_socket(where))
    return await loop.create_connection(protocol, *where)
