"""The metered TCP proxy: the one network path from the inside to the outside.

Clients (the outside) connect to ``listen``; each gets its own connection to ``upstream``
(the inside). Bytes from upstream to client are forwarded only out of a reservation that the
ledger has durably committed; bytes from client to upstream are counted, not capped. The
proxy parses nothing in either stream.
"""

from __future__ import annotations

import asyncio
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
from exfilguard.ledger.store import Grant, Ledger, open_ledger
from exfilguard.meter.config import MeterConfig, parse_hostport
from exfilguard.meter.metrics import MeterMetrics
from exfilguard.meter.publish import parse_target
from exfilguard.meter.worker import LedgerWorker

log = logging.getLogger("exfilguard.meter")

READ_SIZE = 64 * 1024
# A ledger that cannot be written or does not add up: either way, fail closed.
LEDGER_FAILURES = (LedgerUnavailable, LedgerTampered)


@dataclass
class _Conn:
    """One proxied connection's accounting."""

    id: int
    client: asyncio.StreamWriter
    res: int | None = None  # the open reservation
    res_amount: int = 0
    res_used: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    reason: str = ""
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @property
    def allowance(self) -> int:
        return self.res_amount - self.res_used


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
        self._stopped = asyncio.Event()
        self.bytes_out = 0
        self.bytes_in = 0

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
        await self._worker.start()
        try:
            st = await self._worker.call(lambda led: led.ensure_budget(cfg.budget, cfg.cap, cfg.windows))
            self._note_status(st)
            if cfg.upstream_wait > 0:
                await self._wait_upstream()
            host, port = parse_hostport(cfg.listen, "--listen")
            try:
                self._server = await asyncio.start_server(self._handle, host, port, limit=READ_SIZE, backlog=512)
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
            "meter %s listening on %s:%d -> upstream %s; budget %r cap %d, %d reserved, %d remaining; block %d; ledger %s",
            self.meter_id, *self.listen_address, cfg.upstream, cfg.budget, self.cap_bytes, self.reserved_bytes,
            self.remaining_bytes, cfg.reserve_block, cfg.ledger.split("@")[-1],
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
            for t in c.tasks:
                t.cancel()
        for c in conns:
            with contextlib.suppress(BaseException):
                await asyncio.gather(*c.tasks, return_exceptions=True)
        # Let every connection handler run its release.
        for _ in range(50):
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
        host, port = parse_hostport(self.config.upstream, "--upstream")
        deadline = time.monotonic() + self.config.upstream_wait
        last: BaseException | None = None
        while True:
            try:
                _r, w = await asyncio.wait_for(asyncio.open_connection(host, port), max(0.1, deadline - time.monotonic()))
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
            "ledger_error": self.down_reason or None,
            "meter": self.meter_id,
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
            c.client.transport.abort()
            if c.upstream is not None:
                c.upstream.transport.abort()

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

    # -- connections -------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        c = _Conn(next(self._ids), writer)
        cfg = self.config
        if self.state not in ("ok", "exhausted"):
            self.metrics.denials.labels(reason=self.state).inc()
            log.warning("conn %d refused: %s%s", c.id, self.state, f" ({self.down_reason})" if self.down_reason else "")
            writer.transport.abort()
            return
        self._conns[c.id] = c
        self.metrics.open_connections.inc()
        try:
            if self.state == "exhausted":
                # Ask the ledger (another meter may have released bytes, a window may have moved).
                await self._reserve(c)
            host, port = parse_hostport(cfg.upstream, "--upstream")
            try:
                ureader, uwriter = await asyncio.wait_for(
                    asyncio.open_connection(host, port, limit=READ_SIZE), cfg.upstream_connect_timeout
                )
            except (OSError, asyncio.TimeoutError) as exc:
                c.reason = f"upstream unreachable ({getattr(exc, 'strerror', None) or type(exc).__name__})"
                log.warning("conn %d: %s", c.id, c.reason)
                return
            c.upstream = uwriter
            out = asyncio.create_task(self._pump_out(c, ureader, writer))
            inn = asyncio.create_task(self._pump_in(c, reader, uwriter))
            c.tasks = [out, inn]
            await asyncio.wait([out], return_when=asyncio.FIRST_COMPLETED)
            inn.cancel()
            await asyncio.gather(out, inn, return_exceptions=True)
        except _Cut:
            pass
        except LEDGER_FAILURES as exc:
            self._ledger_failed(exc)
        except asyncio.CancelledError:
            pass
        finally:
            await self._finish(c)

    async def _finish(self, c: _Conn) -> None:
        for w in (c.upstream, c.client):
            if w is not None:
                with contextlib.suppress(Exception):
                    w.close()
        if c.res is not None and self.state != "ledger_down":
            try:
                await self._worker.op("release", c.res, c.res_used, self.meter_id)
                self.remaining_bytes += c.allowance
                self.reserved_bytes -= c.allowance
                self._publish()
            except LEDGER_FAILURES as exc:
                self._ledger_failed(exc)
            except Exception as exc:  # noqa: BLE001
                log.error("conn %d: release of reservation %s failed: %s", c.id, c.res, exc)
        for w in (c.upstream, c.client):
            if w is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(w.wait_closed(), 1.0)
        self._conns.pop(c.id, None)
        self.metrics.open_connections.dec()
        log.info("conn %d closed: %d bytes out, %d bytes in%s", c.id, c.bytes_out, c.bytes_in,
                 f" ({c.reason})" if c.reason else "")

    async def _reserve(self, c: _Conn) -> None:
        """Get the connection a new block; raise _Cut when the budget has nothing left."""
        cfg = self.config
        if self.state == "ledger_down":
            raise LedgerUnavailable(self.down_reason or "ledger unavailable")
        if c.res is None:
            g = await self._worker.op("reserve", cfg.budget, cfg.reserve_block, self.meter_id, c.id)
        else:
            g = await self._worker.op("renew", c.res, c.res_used, cfg.budget, cfg.reserve_block, self.meter_id, c.id)
            c.res = None
        if self.state == "ledger_down":  # another connection saw the ledger fail meanwhile
            raise LedgerUnavailable(self.down_reason)
        self._note_grant(g)
        if g.granted <= 0:
            c.reason = f"budget exhausted ({g.reason})"
            self.metrics.denials.labels(reason=g.reason.split(":")[0] or "cap").inc()
            log.warning("conn %d cut: budget %r exhausted (%s) after %d bytes", c.id, cfg.budget, g.reason, c.bytes_out)
            raise _Cut()
        c.res, c.res_amount, c.res_used = g.res, g.granted, 0

    async def _pump_out(self, c: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Upstream -> client, metered: each byte is written only out of a committed reservation."""
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    c.reason = c.reason or "upstream closed"
                    return
                view = memoryview(data)
                off = 0
                while off < len(view):
                    if c.allowance == 0:
                        await self._reserve(c)
                    n = min(c.allowance, len(view) - off)
                    if self.state == "ledger_down" or writer.transport.is_closing():
                        return
                    writer.write(view[off : off + n])
                    c.res_used += n
                    c.bytes_out += n
                    self.bytes_out += n
                    self.metrics.bytes_out.inc(n)
                    off += n
                    await writer.drain()
        except _Cut:
            return
        except LEDGER_FAILURES as exc:
            self._ledger_failed(exc)
        except (ConnectionError, OSError) as exc:
            c.reason = c.reason or f"client gone ({type(exc).__name__})"

    async def _pump_in(self, c: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Client -> upstream: counted and logged, not capped."""
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    if writer.can_write_eof():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    return
                writer.write(data)
                c.bytes_in += len(data)
                self.bytes_in += len(data)
                self.metrics.bytes_in.inc(len(data))
                await writer.drain()
        except (ConnectionError, OSError):
            return

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
