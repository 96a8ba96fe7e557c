"""The meter's forwarding path, top to bottom: accept, reserve, forward, settle, fail closed.

Clients (the outside) connect to ``listen``; each gets its own connection to ``upstream`` (the inside).
A byte from upstream is written to the client only out of a reservation the ledger has durably
committed (`_pump`), counted as forwarded the moment it is handed to the transport; client bytes are
counted, not capped; nothing is parsed. Any ledger failure aborts every connection and refuses new
ones (`_ledger_failed`). A connection is two asyncio Protocols (at the end) and one task (`_run`) that
opens the upstream and, at the end, settles. Meter (service.py) adds start, stop, status, the probe
and signed heads.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any

from exfilguard.base_errors import ConfigError, LedgerTampered, LedgerUnavailable
from exfilguard.ledger import Grant
from exfilguard.meter.blocks import (
    CLOSE_CHARGE, EVENT_MIN, GROW_MAX, GROW_TARGET, OPEN_CHARGE, next_size, stalled_size, within_room,
)
from exfilguard.meter.config import MeterConfig
from exfilguard.meter.conn import _Conn, _Cut, _Res, connect_upstream
from exfilguard.meter.metrics import MeterMetrics
from exfilguard.meter.worker import LedgerWorker

log = logging.getLogger("exfilguard.meter")

READ_SIZE = 256 * 1024  # one write to the client at most: fewer, larger copies for bulk
WRITE_HIGH = 64 * 1024  # the client transport's write-buffer high-water mark
# Bytes counted as forwarded that may still sit in the meter's user-space write buffer, lost if it
# is killed: the high-water mark plus one write (the crash over-count bound in docs/meter.md).
WRITE_SLACK = WRITE_HIGH + READ_SIZE
# A ledger that cannot be written or does not add up: either way, fail closed.
LEDGER_FAILURES = (LedgerUnavailable, LedgerTampered)
__all__ = ["GROW_MAX", "GROW_TARGET", "LEDGER_FAILURES", "READ_SIZE", "WRITE_SLACK", "Proxy", "_Conn", "_Res"]


class Proxy:
    """The forwarding path of a Meter; `_worker` (the ledger's thread) is set by the Meter."""

    _worker: LedgerWorker

    def __init__(self, config: MeterConfig, metrics: MeterMetrics, meter_id: str):
        self.config, self.metrics, self.meter_id = config, metrics, meter_id
        self.state = "starting"  # ok | exhausted | ledger_down | stopping
        self.down_reason = ""
        self.bytes_out = self.bytes_in = 0
        self.charged = 0  # timing charges counted in the ledger (blocks.py), besides bytes_out
        self._conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[Any]] = []
        self._settler: asyncio.Task[None] | None = None
        self._commit_wait = 0.0  # EWMA of the seconds from asking for a block to its grant
        metrics.outstanding.set_function(lambda: sum(c.holding()[0] for c in self._conns.values()))
        metrics.unforwarded.set_function(lambda: sum(c.holding()[1] for c in self._conns.values()))

    # Hooks service.py fills in: a committed grant's figures, what the budget has left (as last seen),
    # connections settled at rest (their commits: a signed head follows).
    def _note_grant(self, g: Grant) -> None: ...
    def effective_remaining(self) -> int: return 1 << 62
    def _at_rest(self, commits: list[asyncio.Future[Grant]]) -> None: ...

    def _charge(self, n: int) -> None:
        self.charged += n
        self.metrics.timing_charged.inc(n)

    def _set_state(self, state: str) -> None:
        self.state = state
        for s in ("ok", "exhausted", "ledger_down", "stopping"):
            self.metrics.state.labels(state=s).set(1 if s == state else 0)

    # -- accept: a connection's life -------------------------------------------------------
    def _accept(self, transport: asyncio.Transport) -> _Conn | None:
        """A client connected: refuse it when the meter is not forwarding, else start its task."""
        c = _Conn(next(self._ids), transport, block=self.config.first_block, last_out=time.monotonic(),
                  owed=OPEN_CHARGE + CLOSE_CHARGE if self.config.timing_charge else 0)
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
            self._ask(c, c.block)  # the first (small) block commits while the upstream connection opens
            if self.state == "exhausted":  # wait for it: another meter may release bytes, a window may move
                await self._next_block(c)
            try:
                await asyncio.wait_for(connect_upstream(cfg.upstream, lambda: _UpstreamSide(self, c)), cfg.upstream_connect_timeout)
            except (OSError, ConfigError, asyncio.TimeoutError) as exc:
                c.reason = f"upstream unreachable ({getattr(exc, 'strerror', None) or exc or type(exc).__name__})"
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
        except (_Cut, asyncio.CancelledError):
            pass
        except LEDGER_FAILURES as exc:
            self._ledger_failed(exc)
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
        if c.upstream is not None:
            c.upstream.close()
        if self.state == "ledger_down" or not self.config.timing_charge:
            c.client.close()  # (timing charged: the client sees the close once its charge is committed)
        if self.state != "ledger_down":
            try:
                await self._settle_all(c, 0, "close")
            except LEDGER_FAILURES as exc:
                self._ledger_failed(exc)
            except Exception as exc:  # noqa: BLE001
                log.error("conn %d: settling its reservations failed: %s", c.id, exc)
            finally:
                c.client.close()  # what was written is flushed first
        self._conns.pop(c.id, None)
        self.metrics.open_connections.dec()
        log.info("conn %d closed: %d bytes out, %d bytes in%s", c.id, c.bytes_out, c.bytes_in, f" ({c.reason})" if c.reason else "")

    # -- forward: upstream -> client, only out of committed blocks ---------------------------
    def _from_upstream(self, c: _Conn, data: bytes) -> None:
        c.backlog.append(data)
        if len(data) < EVENT_MIN and self.config.timing_charge:  # an arrival the inside timed: >= EVENT_MIN
            c.owed += EVENT_MIN - len(data)
        if c.waiter is None and not c.client_full:
            self._pump(c)

    def _pump(self, c: _Conn) -> None:
        """Write c.backlog out of committed blocks, in order, at most READ_SIZE at a time and not past the
        client's high-water mark (counted but unsent stays within WRITE_SLACK); when the next block has
        not committed yet, the upstream is paused and _await_block waits for it."""
        q = c.backlog
        out = self.metrics.bytes_out
        try:
            while q and not c.client_full:
                if c.cur is None or c.cur.used == c.cur.amount:
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
                if c.owed:  # timing charges first: committed before the bytes whose arrival they cover
                    pay = min(c.owed, cur.amount - cur.used)
                    cur.used += pay
                    c.owed -= pay
                    self._charge(pay)
                    continue
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

    def _flow(self, c: _Conn) -> None:
        """Read from the upstream only while the client keeps up and no block is awaited."""
        up = c.upstream
        if up is None or up.is_closing():
            return
        if c.client_full or c.waiter is not None:
            up.pause_reading()  # both idempotent (asyncio and uvloop)
        else:
            up.resume_reading()

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

    # -- reserve: adaptive, pipelined blocks ----------------------------------------------
    def _ask(self, c: _Conn, want: int, releases: list[tuple[int, int]] | None = None) -> asyncio.Future[Grant]:
        """Start the ledger call that settles `releases` and this connection's spent blocks and
        reserves `want` bytes (one transaction); it becomes `c.nxt`."""
        rel = [(r.id, r.used) for r in c.spent] + (releases or [])
        c.spent = []
        want = within_room(want, self.effective_remaining()) if want > 0 else 0
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

    def _rotate(self, c: _Conn) -> asyncio.Future[Grant]:
        """The current block is used up (or there is none): size the block after next by the
        drained one's rate, leave the drained one to be settled with the next call, and return
        the next block's commit (asking for it if none is in flight)."""
        if self.state == "ledger_down":
            raise LedgerUnavailable(self.down_reason or "ledger unavailable")
        if c.cur is not None:
            cfg, cur = self.config, c.cur
            c.block = next_size(cur.used, time.monotonic() - c.cur_since, c.block, cur.amount, self._commit_wait,
                                cfg.first_block, cfg.reserve_block)
            c.spent.append(cur)
            c.cur = None
        return c.nxt if c.nxt is not None else self._ask(c, c.block)

    def _take(self, c: _Conn, fut: asyncio.Future[Grant], stalled: bool) -> None:
        """Make the committed `fut` the block being forwarded and ask for the next (pipelining);
        raise _Cut when the budget denied it, the ledger's error when the commit failed."""
        if stalled:
            c.block = stalled_size(c.block, self.config.reserve_block)
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

    # -- settle: at close, and at rest -----------------------------------------------------
    async def _settle_all(self, c: _Conn, want: int, reason: str) -> Grant | None:
        """Settle every reservation the connection holds at what it forwarded; with want > 0
        reserve a fresh block in the same transaction (it becomes c.nxt)."""
        rel: list[tuple[int, int]] = []
        nxt: Grant | None = None
        if c.nxt is not None:
            fut, c.nxt = c.nxt, None
            with contextlib.suppress(Exception):
                g = await asyncio.shield(fut)
                nxt = g if g.granted > 0 and g.res is not None else None
        owed = c.owed  # unpaid timing charges (the close's at least): from what it holds, current block first
        pay_cur = 0 if c.cur is None else min(owed, c.cur.amount - c.cur.used)
        pay_nxt = 0 if nxt is None else min(owed - pay_cur, nxt.granted)
        if nxt is not None:
            rel.append((nxt.res, pay_nxt))  # type: ignore[arg-type]
        if c.cur is not None:
            rel.append((c.cur.id, c.cur.used + pay_cur))
            c.cur = None
        self._charge(pay_cur + pay_nxt)
        c.owed = owed - pay_cur - pay_nxt
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
            now, commits = time.monotonic(), []
            for c in list(self._conns.values()):
                if c.settled or c.busy or c.waiter is not None or c.backlog or c.closing or now - c.last_out < idle:
                    continue
                if c.nxt is not None and not c.nxt.done():
                    continue  # a commit for it is in flight; look again next round
                self._settle_idle(c)
                commits.append(c.nxt)
            if commits:
                self._at_rest(commits)

    # -- fail closed -----------------------------------------------------------------------
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


class _ClientSide(asyncio.Protocol):
    """The outside's connection: its bytes go to the upstream (counted, not capped)."""

    def __init__(self, meter: Proxy):
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

    def __init__(self, meter: Proxy, c: _Conn):
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
