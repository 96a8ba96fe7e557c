"""The metered TCP proxy: the one network path from the inside to the outside.

Clients (the outside) connect to ``listen``; each gets its own connection to ``upstream``
(the inside). Bytes from upstream to client are forwarded only out of a reservation that the
ledger has durably committed; bytes from client to upstream are counted, not capped. The
proxy parses nothing in either stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from exfilguard.errors import ConfigError, LedgerTampered, LedgerUnavailable, UpstreamUnavailable
from exfilguard.ledger.keys import load_private_key, sign_tree_head
from exfilguard.ledger import Grant, Ledger, open_ledger
from exfilguard.meter import loop as event_loop
from exfilguard.meter.config import MeterConfig, parse_hostport
from exfilguard.meter.metrics import MeterMetrics
from exfilguard.meter.publish import parse_target
from exfilguard.meter.worker import LedgerWorker

log = logging.getLogger("exfilguard.meter")

READ_SIZE = 256 * 1024  # one read from the upstream: fewer, larger copies for bulk
WRITE_HIGH = 64 * 1024  # the client transport's write-buffer high-water mark (drain() waits above it)
# Bytes counted as forwarded that may still sit in the meter's user-space write buffer, lost if it
# is killed: the high-water mark plus one read (the crash over-count bound in docs/meter.md).
WRITE_SLACK = WRITE_HIGH + READ_SIZE
# A connection asks for a block its drain rate uses in about this many seconds, at most GROW_MAX
# times the last block: long enough that the pipelined commit finishes before the block drains,
# and never much more than the connection has just shown it forwards.
GROW_TARGET = 0.25
GROW_MAX = 4
# ... or, when the ledger is slow, this many times the recent wait for a reservation, so that the
# next block (asked for as the current one starts) commits before the current one drains.
COMMIT_FACTOR = 4
# A ledger that cannot be written or does not add up: either way, fail closed.
LEDGER_FAILURES = (LedgerUnavailable, LedgerTampered)


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
    block: int = 0  # the size the next reservation asks for (adaptive)
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
    reason: str = ""
    upstream: asyncio.Transport | None = None
    inbuf: list[bytes] = field(default_factory=list)  # client bytes read before the upstream connected
    backlog: collections.deque[bytes | memoryview] = field(default_factory=collections.deque)
    waiter: asyncio.Future[None] | None = None  # waits for the next block's commit; upstream paused
    client_full: bool = False  # the client's write buffer is above WRITE_HIGH; upstream paused
    upstream_done: bool = False  # the upstream closed; end once the backlog is out
    task: asyncio.Task[None] | None = None
    done: asyncio.Future[None] | None = None  # set when the connection is to end (made at accept)

    @property
    def allowance(self) -> int:
        return 0 if self.cur is None else self.cur.amount - self.cur.used

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


class Meter:
    """A running meter: ``await start()``, then ``await stop()`` (or use run_meter)."""

    def __init__(self, config: MeterConfig):
        config.validate()
        self.config = config
        self.meter_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.metrics = MeterMetrics()
        self.state = "starting"  # ok | exhausted | ledger_down | stopping
        self.down_reason = ""
        self.cap_bytes = config.cap
        self.reserved_bytes = 0
        self.remaining_bytes = config.cap
        self.window_remaining: int | None = None
        self.listen_address: tuple[str, int] | None = None
        self.metrics_address: tuple[str, int] | None = None
        self._worker = LedgerWorker(self._open_ledger, on_commit=self.metrics.commit_seconds.observe)
        self._key = load_private_key(config.signing_key) if config.signing_key else None
        self._publisher = parse_target(config.publish_heads)
        if self._publisher is not None and self._key is None:
            raise ConfigError("--publish-heads needs --signing-key: only signed heads are published")
        self._server: asyncio.base_events.Server | None = None
        self._metrics_server: asyncio.base_events.Server | None = None
        self._conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[Any]] = []
        self._signed_size = -1
        self._settler: asyncio.Task[None] | None = None
        self._commit_wait = 0.0  # EWMA of the seconds from asking for a block to its grant
        self.metrics.outstanding.set_function(lambda: sum(c.holding()[0] for c in self._conns.values()))
        self.metrics.unforwarded.set_function(lambda: sum(c.holding()[1] for c in self._conns.values()))
        self._stopped = asyncio.Event()
        self.bytes_out = 0
        self.bytes_in = 0
        self.loop_name = ""

    def _open_ledger(self) -> Ledger:
        # The meter's state comes from the log, never from a summary row: replay it all now
        # (LedgerTampered when the rows or the head row disagree with it) and keep following it.
        led = open_ledger(self.config.ledger)
        try:
            # Heads we published before must still be in the log: a rolled-back ledger is refused.
            led.follow_log(self._publisher.published() if self._publisher is not None else ())
        except BaseException:
            led.close()
            raise
        return led

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Open the ledger, create or check the budget, check the upstream, start listening."""
        cfg = self.config
        self.loop_name = event_loop.name()
        await self._worker.start()
        try:
            st = await self._worker.call(lambda led: led.ensure_budget(cfg.budget, cfg.cap, cfg.windows))
            self._note_status(st)
            if cfg.upstream_wait > 0:
                await self._wait_upstream()
            host, port = parse_hostport(cfg.listen, "--listen")
            try:
                self._server = await asyncio.get_running_loop().create_server(
                    lambda: _ClientSide(self), host, port, backlog=512
                )
            except OSError as exc:
                raise ConfigError(f"cannot listen on {cfg.listen}: {exc.strerror}") from None
            self.listen_address = self._server.sockets[0].getsockname()[:2]
            if cfg.metrics:
                mhost, mport = parse_hostport(cfg.metrics, "--metrics")
                try:
                    self._metrics_server = await asyncio.start_server(self._serve_http, mhost, mport)
                except OSError as exc:
                    raise ConfigError(f"cannot listen on --metrics {cfg.metrics}: {exc.strerror}") from None
                self.metrics_address = self._metrics_server.sockets[0].getsockname()[:2]
            await self._worker.op(
                "record",
                "meter_start",
                dict(
                    budget=cfg.budget, meter=self.meter_id, pid=os.getpid(), listen=cfg.listen,
                    upstream=cfg.upstream, block=cfg.reserve_block, key=self._key_id(),
                ),
            )
        except BaseException:
            await self._close_servers()
            await self._worker.close()
            raise
        self._set_state("ok" if self.remaining_bytes > 0 else "exhausted")
        self.metrics.ledger_up.set(1)
        if self._key is None:
            log.warning("no --signing-key: tree heads are NOT signed; an auditor can check the log's "
                        "consistency but nobody vouches for it")
        self._tasks.append(asyncio.create_task(self._health_loop()))
        if self._key is not None:
            self._tasks.append(asyncio.create_task(self._sign_loop()))
        log.info(
            "meter %s listening on %s:%d -> upstream %s; budget %r cap %d, %d reserved, %d remaining; block %d; ledger %s; %s",
            self.meter_id, *self.listen_address, cfg.upstream, cfg.budget, self.cap_bytes, self.reserved_bytes,
            self.remaining_bytes, cfg.reserve_block, cfg.ledger.split("@")[-1], self.loop_name,
        )

    async def wait_closed(self) -> None:
        """Return when stop() has finished."""
        await self._stopped.wait()

    async def stop(self) -> None:
        """Stop accepting, close every connection (releasing unused reservations), sign a final head."""
        if self.state == "stopping" or self._stopped.is_set():
            await self._stopped.wait()
            return
        self._set_state("stopping")
        for t in self._tasks:
            t.cancel()
        await self._close_servers()
        conns = list(self._conns.values())
        for c in conns:
            c.reason = c.reason or "meter stopping"
            if c.task is not None and not c.closing:  # a closing one is settling: let it finish
                c.task.cancel()
        for c in conns:
            if c.task is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.gather(c.task, return_exceptions=True)
        # Let every connection handler settle (its pipelined block may still be committing): up to 5 s.
        for _ in range(500):
            if not self._conns:
                break
            await asyncio.sleep(0.01)
        try:
            await self._worker.op(
                "record", "meter_stop",
                dict(budget=self.config.budget, meter=self.meter_id, bytes_out=self.bytes_out, bytes_in=self.bytes_in),
            )
            await self._sign_head()
        except LEDGER_FAILURES as exc:
            log.error("could not record the meter's stop in the ledger: %s", exc)
        await self._worker.close()
        log.info("meter %s stopped: %d bytes out, %d bytes in", self.meter_id, self.bytes_out, self.bytes_in)
        self._stopped.set()

    async def _close_servers(self) -> None:
        for srv in (self._server, self._metrics_server):
            if srv is not None:
                srv.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(srv.wait_closed(), 1.0)

    async def _wait_upstream(self) -> None:
        up = self.config.upstream
        deadline = time.monotonic() + self.config.upstream_wait
        last: BaseException | None = None
        while True:
            try:
                opening = asyncio.open_unix_connection(up[5:]) if up.startswith("unix:") else asyncio.open_connection(*parse_hostport(up, "--upstream"))
                _r, w = await asyncio.wait_for(opening, max(0.1, deadline - time.monotonic()))
                w.close()
                return
            except (OSError, asyncio.TimeoutError) as exc:
                last = exc
            if time.monotonic() >= deadline:
                reason = getattr(last, "strerror", None) or type(last).__name__
                raise UpstreamUnavailable(
                    f"upstream {self.config.upstream} is unreachable ({reason}) after {self.config.upstream_wait:g}s; "
                    "start the inside worker first or fix --upstream"
                )
            await asyncio.sleep(0.1)

    # -- state -------------------------------------------------------------------------
    def _set_state(self, state: str) -> None:
        self.state = state
        for s in ("ok", "exhausted", "ledger_down", "stopping"):
            self.metrics.state.labels(state=s).set(1 if s == state else 0)

    def _note_status(self, st: Any) -> None:
        self.cap_bytes = st.cap_bytes
        self.reserved_bytes = st.reserved_bytes
        self.remaining_bytes = st.remaining_bytes
        self.window_remaining = min((w["remaining_bytes"] for w in st.windows), default=None)
        self.metrics.budget_forwarded.set(st.reserved_bytes - st.outstanding_bytes)
        self.metrics.budget_outstanding.set(st.outstanding_bytes)
        self._publish()

    def _note_grant(self, g: Grant) -> None:
        self.reserved_bytes = g.reserved_after
        self.remaining_bytes = g.remaining
        if g.reason.startswith("window"):
            self.window_remaining = 0
        self._publish()

    def _publish(self) -> None:
        self.metrics.reserved.set(self.reserved_bytes)
        self.metrics.remaining.set(self.effective_remaining())
        if self.state in ("ok", "exhausted"):
            self._set_state("ok" if self.effective_remaining() > 0 else "exhausted")

    def effective_remaining(self) -> int:
        """Bytes the budget can still grant as last seen: the cap's and every window's room."""
        if self.window_remaining is None:
            return self.remaining_bytes
        return min(self.remaining_bytes, self.window_remaining)

    def status(self) -> dict[str, Any]:
        """A snapshot for the outside (``GET /status``): state ok | exhausted | ledger_down | stopping."""
        return {
            "budget": self.config.budget,
            "state": self.state,
            "cap_bytes": self.cap_bytes,
            "reserved_bytes": self.reserved_bytes,
            "remaining_bytes": self.effective_remaining(),
            "cap_remaining_bytes": self.remaining_bytes,
            "open_connections": len(self._conns),
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "outstanding_bytes": sum(c.holding()[0] for c in self._conns.values()),
            "unforwarded_reserved_bytes": sum(c.holding()[1] for c in self._conns.values()),
            "ledger_error": self.down_reason or None,
            "meter": self.meter_id,
            "loop": self.loop_name,
        }

    def _ledger_failed(self, exc: BaseException) -> None:
        """Fail closed: stop forwarding on every connection and refuse new ones."""
        if self.state == "ledger_down":
            return
        self.down_reason = str(exc)
        self._set_state("ledger_down")
        self.metrics.ledger_up.set(0)
        self.metrics.ledger_failures.inc()
        log.error("LEDGER UNAVAILABLE, failing closed: no byte is forwarded and new connections are refused "
                  "until the ledger can be written again: %s", exc)
        for c in list(self._conns.values()):
            c.reason = c.reason or "ledger unavailable"
            c.backlog.clear()
            c.client.abort()
            if c.upstream is not None:
                c.upstream.abort()
            self._end(c, "ledger unavailable")

    async def _health_loop(self) -> None:
        """Probe the ledger with a write every health_interval, up or down.

        A connection may hold a large reservation and forward for a long time without a
        ledger write; this probe is what makes `chmod a-w` (or a dead database) stop it within
        one interval. A probe that does not answer within probe_timeout counts as a failure.
        """
        cfg = self.config
        last_status = 0.0
        while True:
            await asyncio.sleep(cfg.health_interval)
            try:
                probe = asyncio.ensure_future(self._worker.call(lambda led: led.ping()))
                try:
                    await asyncio.wait_for(asyncio.shield(probe), cfg.probe_timeout)
                except asyncio.TimeoutError:
                    probe.add_done_callback(lambda f: f.cancelled() or f.exception())
                    raise LedgerUnavailable(
                        f"ledger {cfg.ledger.split('@')[-1]} did not complete a write probe within {cfg.probe_timeout:g}s"
                    ) from None
                if self.state == "ledger_down":
                    self.down_reason = ""
                    self.metrics.ledger_up.set(1)
                    self._set_state("ok")
                    log.warning("ledger writable again; forwarding resumes")
                if time.monotonic() - last_status >= 1.0:
                    st = await self._worker.call(lambda led: led.status(cfg.budget))
                    self._note_status(st)
                    last_status = time.monotonic()
            except LEDGER_FAILURES as exc:
                self._ledger_failed(exc)
            except Exception as exc:  # noqa: BLE001 - keep probing
                log.warning("ledger health check: %s", exc)

    # -- signed tree heads ---------------------------------------------------------------
    def _key_id(self) -> str | None:
        if self._key is None:
            return None
        from exfilguard.ledger.keys import key_id

        return key_id(self._key.public_key())

    async def _sign_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sth_interval)
            try:
                await self._sign_head()
            except LEDGER_FAILURES as exc:
                self._ledger_failed(exc)

    async def _sign_head(self) -> None:
        if self._key is None:
            return
        key = self._key

        def sign(led: Ledger) -> tuple[int, Any]:
            head = led.tree_head()
            if head.tree_size == self._signed_size:
                return head.tree_size, None
            sth = sign_tree_head(key, head.tree_size, max(head.ts, int(time.time() * 1_000_000)), head.root)
            led.add_tree_head(sth)
            return head.tree_size, sth

        self._signed_size, sth = await self._worker.call(sign)
        if sth is not None and self._publisher is not None:
            # Outside the ledger, so that rolling the ledger back cannot take the head with it.
            try:
                await asyncio.to_thread(self._publisher.publish, sth)
            except OSError as exc:
                self.metrics.ledger_failures.inc()
                log.error("could not publish signed tree head %d to %s: %s", sth.tree_size, self._publisher.target, exc)

    # -- connections: protocols, no per-message task ----------------------------------------
    # Each accepted connection is a pair of asyncio Protocols (client side, upstream side) and
    # one task (_run) that opens the upstream and, at the end, settles. Forwarding happens in
    # the protocols' callbacks: data from the upstream is written to the client at once when
    # the current block covers it (or the next block has already committed); otherwise it
    # waits in c.backlog, the upstream is paused, and one task waits for the commit.
    def _accept(self, transport: asyncio.Transport) -> _Conn | None:
        """A client connected: refuse it when the meter is not forwarding, else start its task."""
        c = _Conn(next(self._ids), transport, block=self.config.first_block, last_out=time.monotonic())
        c.done = asyncio.get_running_loop().create_future()
        if self.state not in ("ok", "exhausted"):
            self.metrics.denials.labels(reason=self.state).inc()
            log.warning("conn %d refused: %s%s", c.id, self.state, f" ({self.down_reason})" if self.down_reason else "")
            transport.abort()
            return None
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        transport.pause_reading()  # until the upstream is connected
        self._conns[c.id] = c
        self.metrics.open_connections.inc()
        if self._settler is None:
            self._settler = asyncio.create_task(self._settle_loop())
            self._tasks.append(self._settler)
        c.task = asyncio.create_task(self._run(c))
        return c

    async def _run(self, c: _Conn) -> None:
        cfg = self.config
        try:
            # The first (small) block commits while the upstream connection opens.
            self._ask(c, c.block)
            if self.state == "exhausted":
                # Wait for it (another meter may have released bytes, a window may have moved).
                await self._next_block(c)
            loop = asyncio.get_running_loop()
            try:
                if cfg.upstream.startswith("unix:"):
                    opening = loop.create_unix_connection(lambda: _UpstreamSide(self, c), cfg.upstream[5:])
                else:
                    host, port = parse_hostport(cfg.upstream, "--upstream")
                    opening = loop.create_connection(lambda: _UpstreamSide(self, c), host, port)
                await asyncio.wait_for(opening, cfg.upstream_connect_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                c.reason = f"upstream unreachable ({getattr(exc, 'strerror', None) or type(exc).__name__})"
                log.warning("conn %d: %s", c.id, c.reason)
                return
            assert c.done is not None
            if not c.done.done():
                if c.inbuf and c.upstream is not None:
                    data, c.inbuf = b"".join(c.inbuf), []
                    c.upstream.write(data)
                    self._count_in(c, len(data))
                c.client.resume_reading()
            await c.done
        except _Cut:
            pass
        except LEDGER_FAILURES as exc:
            self._ledger_failed(exc)
        except asyncio.CancelledError:
            pass
        finally:
            await self._finish(c)

    def _count_in(self, c: _Conn, n: int) -> None:
        c.bytes_in += n
        self.bytes_in += n
        self.metrics.bytes_in.inc(n)

    def _end(self, c: _Conn, reason: str) -> None:
        """The connection forwards no more: its task closes both sides and settles."""
        c.reason = c.reason or reason
        if c.done is not None and not c.done.done():
            c.done.set_result(None)

    async def _finish(self, c: _Conn) -> None:
        c.closing = True
        if c.waiter is not None:
            c.waiter.cancel()
        for t in (c.upstream, c.client):
            if t is not None:
                t.close()  # what was written is flushed first
        if self.state != "ledger_down":
            try:
                await self._settle_all(c, 0, "close")
            except LEDGER_FAILURES as exc:
                self._ledger_failed(exc)
            except Exception as exc:  # noqa: BLE001
                log.error("conn %d: settling its reservations failed: %s", c.id, exc)
        self._conns.pop(c.id, None)
        self.metrics.open_connections.dec()
        log.info("conn %d closed: %d bytes out, %d bytes in%s", c.id, c.bytes_out, c.bytes_in,
                 f" ({c.reason})" if c.reason else "")

    def _flow(self, c: _Conn) -> None:
        """Read from the upstream only while the client keeps up and no block is awaited."""
        up = c.upstream
        if up is None or up.is_closing():
            return
        if c.client_full or c.waiter is not None:
            up.pause_reading()  # both idempotent (asyncio and uvloop)
        else:
            up.resume_reading()

    def _from_upstream(self, c: _Conn, data: bytes) -> None:
        c.backlog.append(data)
        if c.waiter is None and not c.client_full:
            self._pump(c)

    def _pump(self, c: _Conn) -> None:
        """Upstream -> client, metered: write c.backlog out of committed blocks, in order.

        Each write is at most READ_SIZE bytes and stops once the client's buffer is above its
        high-water mark (resume_writing pumps again): what is counted but unsent stays within
        WRITE_SLACK. When the current block is used up and the next has not committed yet, the
        upstream is paused and _await_block waits for it.
        """
        q = c.backlog
        out = self.metrics.bytes_out
        try:
            while q and not c.client_full:
                if c.allowance == 0:
                    fut = self._rotate(c)
                    if not fut.done():
                        c.waiter = asyncio.ensure_future(self._await_block(c, fut))
                        self._flow(c)
                        return
                    self._take(c, fut, stalled=False)
                cur = c.cur
                assert cur is not None
                if self.state == "ledger_down" or c.client.is_closing():
                    q.clear()
                    return
                data = q[0]
                n = min(cur.amount - cur.used, len(data), READ_SIZE)
                if n == len(data):
                    q.popleft()
                else:
                    view = memoryview(data)
                    q[0], data = view[n:], view[:n]
                # Counted as used the moment it is handed to the transport: never less than what left.
                cur.used += n
                c.bytes_out += n
                self.bytes_out += n
                out.inc(n)
                c.settled = False
                c.client.write(data)  # may call pause_writing (client_full) at once
            c.last_out = time.monotonic()
            if not q and c.upstream_done:
                self._end(c, "upstream closed")
        except Exception as exc:  # noqa: BLE001 - sorted by _conn_failed
            self._conn_failed(c, exc, "forwarding")

    async def _await_block(self, c: _Conn, fut: asyncio.Future[Grant]) -> None:
        """The upstream is paused until `fut` commits: then make it current and forward again."""
        try:
            await self._wait_commit(fut)
        except asyncio.CancelledError:
            if not c.closing:  # not _finish's cancel: the commit itself was cancelled; nothing to forward from
                self._end(c, "reservation cancelled")
            return
        finally:
            c.waiter = None
        if c.closing:
            return
        try:
            if c.nxt is not fut:  # settled meanwhile (cannot happen while waiting: the settler keeps off)
                raise LedgerUnavailable(f"conn {c.id}: the awaited block was taken by another settlement")
            self._take(c, fut, stalled=True)
        except Exception as exc:  # noqa: BLE001 - sorted by _conn_failed
            self._conn_failed(c, exc, "reservation")
            return
        self._flow(c)
        self._pump(c)

    def _conn_failed(self, c: _Conn, exc: Exception, what: str) -> None:
        """An error in a protocol callback: a denial ends the connection, a ledger failure fails
        the meter closed, anything else ends this connection only."""
        if isinstance(exc, _Cut):
            self._end(c, c.reason)
        elif isinstance(exc, LEDGER_FAILURES):
            self._ledger_failed(exc)
        else:
            log.error("conn %d: %s failed: %s", c.id, what, exc)
            self._end(c, f"error ({type(exc).__name__})")

    # -- reservations: adaptive, pipelined, settled at rest ------------------------------
    def _ask(self, c: _Conn, want: int, releases: list[tuple[int, int]] | None = None) -> asyncio.Future[Grant]:
        """Start the ledger call that settles `releases` and this connection's spent blocks and
        reserves `want` bytes (one transaction); it becomes `c.nxt`."""
        rel = [(r.id, r.used) for r in c.spent] + (releases or [])
        c.spent = []
        fut = asyncio.ensure_future(self._worker.op("settle", rel, self.config.budget, want, self.meter_id, c.id))
        t0 = time.monotonic()
        fut.add_done_callback(lambda f: self._granted(f, t0))
        c.nxt = fut
        return fut

    def _granted(self, fut: asyncio.Future[Grant], t0: float) -> None:
        """Note a grant's totals as soon as it commits; a ledger failure fails closed at once."""
        if fut.cancelled():
            return
        self._commit_wait = 0.8 * self._commit_wait + 0.2 * (time.monotonic() - t0)
        exc = fut.exception()
        if isinstance(exc, LEDGER_FAILURES):
            self._ledger_failed(exc)
        elif exc is not None:
            log.error("reservation failed: %s", exc)
        else:
            g = fut.result()
            if g.granted > 0:
                self.metrics.block.observe(g.granted)
            self._note_grant(g)

    def _next_size(self, c: _Conn, now: float) -> int:
        """The size of the block to ask for next: what the current block's drain rate uses in
        GROW_TARGET seconds (or COMMIT_FACTOR x the recent wait for a reservation, if longer), at
        most GROW_MAX x the largest of the current block and the last size asked, within
        [first block, ceiling]."""
        cfg = self.config
        cur = c.cur
        if cur is None:
            return c.block
        rate = cur.used / max(now - c.cur_since, 1e-4)
        horizon = max(GROW_TARGET, COMMIT_FACTOR * self._commit_wait)
        want = min(int(rate * horizon), GROW_MAX * max(c.block, cur.amount), cfg.reserve_block)
        return max(cfg.first_block, want)

    def _rotate(self, c: _Conn) -> asyncio.Future[Grant]:
        """The current block is used up (or there is none): size the block after next by the
        drained one's rate, leave the drained one to be settled with the next call, and return
        the next block's commit (asking for it if none is in flight)."""
        if self.state == "ledger_down":
            raise LedgerUnavailable(self.down_reason or "ledger unavailable")
        if c.cur is not None:
            c.block = self._next_size(c, time.monotonic())
            c.spent.append(c.cur)
            c.cur = None
        return c.nxt if c.nxt is not None else self._ask(c, c.block)

    def _take(self, c: _Conn, fut: asyncio.Future[Grant], stalled: bool) -> None:
        """Make the committed `fut` the block being forwarded and ask for the next (pipelining);
        raise _Cut when the budget denied it, the ledger's error when the commit failed."""
        if stalled:  # the block drained before the next one committed: too small for this ledger, grow faster
            c.block = min(self.config.reserve_block, GROW_MAX * c.block)
        if c.nxt is fut:
            c.nxt = None
        if self.state == "ledger_down":  # another connection saw the ledger fail meanwhile
            raise LedgerUnavailable(self.down_reason)
        g = fut.result()
        if g.granted <= 0:
            c.reason = f"budget exhausted ({g.reason})"
            self.metrics.denials.labels(reason=g.reason.split(":")[0] or "cap").inc()
            log.warning("conn %d cut: budget %r exhausted (%s) after %d bytes", c.id, self.config.budget, g.reason, c.bytes_out)
            raise _Cut()
        assert g.res is not None
        c.cur = _Res(g.res, g.granted)
        c.cur_since = time.monotonic()
        self._ask(c, c.block)

    async def _next_block(self, c: _Conn) -> None:
        """Wait for the next committed block and make it current (the first block of a
        connection when the budget is exhausted at accept); raise _Cut when it is denied."""
        fut = self._rotate(c)
        stalled = not fut.done()
        if stalled:
            c.busy = True
            try:
                await self._wait_commit(fut)
            finally:
                c.busy = False
        self._take(c, fut, stalled)

    async def _wait_commit(self, fut: asyncio.Future[Grant]) -> None:
        """Wait until a pipelined reservation's commit is done (its outcome, grant or error, is
        read by _take), counting the wait in block_wait."""
        t0 = time.monotonic()
        try:
            # shield: a cancelled wait must not cancel a commit whose grant _finish still has to release.
            await asyncio.shield(fut)
        except Exception:  # noqa: BLE001 - _take raises it
            pass
        finally:
            self.metrics.block_wait.inc(time.monotonic() - t0)

    async def _settle_all(self, c: _Conn, want: int, reason: str) -> Grant | None:
        """Settle every reservation the connection holds at what it forwarded; with want > 0
        reserve a fresh block in the same transaction (it becomes c.nxt)."""
        rel: list[tuple[int, int]] = []
        if c.nxt is not None:
            fut, c.nxt = c.nxt, None
            with contextlib.suppress(Exception):
                g = await asyncio.shield(fut)
                if g.granted > 0 and g.res is not None:
                    rel.append((g.res, 0))
        if c.cur is not None:
            rel.append((c.cur.id, c.cur.used))
            c.cur = None
        if not rel and not c.spent and want <= 0:
            return None
        self.metrics.settlements.labels(reason=reason).inc()
        return await self._ask(c, want, rel)

    def _settle_idle(self, c: _Conn) -> None:
        """Settle an idle connection and keep one first-size block reserved for its next answer."""
        rel: list[tuple[int, int]] = []
        nxt = c.granted_next()
        if nxt is not None and nxt.res is not None:
            rel.append((nxt.res, 0))
        if c.cur is not None:
            rel.append((c.cur.id, c.cur.used))
        c.cur = None
        c.block = self.config.first_block
        c.settled = True
        self.metrics.settlements.labels(reason="idle").inc()
        self._ask(c, c.block, rel)

    async def _settle_loop(self) -> None:
        """Every quarter of --settle-idle, settle the connections idle for --settle-idle."""
        idle = self.config.settle_idle
        while True:
            await asyncio.sleep(max(0.02, idle / 4))
            if self.state not in ("ok", "exhausted"):
                continue
            now = time.monotonic()
            for c in list(self._conns.values()):
                if c.settled or c.busy or c.waiter is not None or c.backlog or c.closing or now - c.last_out < idle:
                    continue
                if c.nxt is not None and not c.nxt.done():
                    continue  # a commit for it is in flight; look again next round
                self._settle_idle(c)

    # -- metrics and status endpoint ---------------------------------------------------
    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            parts = head.split(b"\r\n", 1)[0].split()
            path = parts[1].decode("ascii", "replace").split("?")[0] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] != b"GET":
                code, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                code, ctype, body = "200 OK", self.metrics.content_type, self.metrics.render()
            elif path == "/status":
                code, ctype, body = "200 OK", "application/json", json.dumps(self.status()).encode() + b"\n"
            else:
                code, ctype, body = "404 Not Found", "text/plain", b"try /metrics or /status\n"
            writer.write(
                f"HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


class _ClientSide(asyncio.Protocol):
    """The outside's connection: its bytes go to the upstream (counted, not capped)."""

    def __init__(self, meter: Meter):
        self.meter = meter
        self.c: _Conn | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.c = self.meter._accept(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        c = self.c
        if c is None:
            return
        if c.upstream is None:  # reading is paused until it connects; keep anything already read
            c.inbuf.append(data)
            return
        c.upstream.write(data)
        self.meter._count_in(c, len(data))

    def eof_received(self) -> bool:
        c = self.c
        if c is not None and c.upstream is not None and c.upstream.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                c.upstream.write_eof()
        return True  # half-closed: the answer may still come back

    def connection_lost(self, exc: Exception | None) -> None:
        if self.c is not None:
            self.meter._end(self.c, f"client gone ({type(exc).__name__})" if exc else "client closed")

    def pause_writing(self) -> None:
        if self.c is not None:
            self.c.client_full = True
            self.meter._flow(self.c)

    def resume_writing(self) -> None:
        c = self.c
        if c is not None:
            c.client_full = False
            if c.waiter is None:
                self.meter._pump(c)
            self.meter._flow(c)


class _UpstreamSide(asyncio.Protocol):
    """The meter's connection to the inside: its bytes are forwarded only out of reservations."""

    def __init__(self, meter: Meter, c: _Conn):
        self.meter = meter
        self.c = c

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.c.upstream = transport  # type: ignore[assignment]
        if self.c.done is None or self.c.done.done():
            transport.close()

    def data_received(self, data: bytes) -> None:
        self.meter._from_upstream(self.c, data)

    def eof_received(self) -> bool:
        self._done()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.c.reason = self.c.reason or f"upstream error ({type(exc).__name__})"
        self._done()

    def _done(self) -> None:
        c = self.c
        c.upstream_done = True
        if not c.backlog:
            self.meter._end(c, "upstream closed")  # else _pump ends it once the backlog is out

    def pause_writing(self) -> None:
        self.c.client.pause_reading()

    def resume_writing(self) -> None:
        if not self.c.closing:
            self.c.client.resume_reading()


async def run_meter(config: MeterConfig, ready: asyncio.Event | None = None, meter_out: list[Meter] | None = None) -> None:
    """Run a meter until cancelled; set `ready` once it accepts connections.

    Raises ConfigError, LedgerUnavailable or UpstreamUnavailable when it cannot start. On
    cancellation it stops cleanly (releases reservations, records the stop, signs a head).
    """
    meter = Meter(config)
    if meter_out is not None:
        meter_out.append(meter)
    await meter.start()
    if ready is not None:
        ready.set()
    try:
        await meter.wait_closed()
    finally:
        await asyncio.shield(meter.stop())
