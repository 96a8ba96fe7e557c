"""A running meter: start, stop, status and the metrics endpoint around the forwarding path (proxy.py).

Beside it: the ledger probe that is the kill switch (probe.py), signed heads and where they are
published (heads.py), metrics (metrics.py), configuration (config.py) and the ledger's thread
(worker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from exfilguard.base_errors import ConfigError, UpstreamUnavailable
from exfilguard.ledger import Grant, Ledger, open_ledger
from exfilguard.ledger.keys import load_private_key
from exfilguard.meter import loop as event_loop
from exfilguard.meter.config import MeterConfig, parse_hostport
from exfilguard.meter.heads import HeadPublisher, HeadSigner
from exfilguard.meter.metrics import MeterMetrics
from exfilguard.meter.probe import LedgerProbe
from exfilguard.meter.conn import connect_upstream
from exfilguard.meter.proxy import LEDGER_FAILURES, Proxy, _ClientSide
from exfilguard.meter.worker import LedgerWorker

log = logging.getLogger("exfilguard.meter")


class Meter(HeadSigner, LedgerProbe, Proxy):
    """A running meter: ``await start()``, then ``await stop()`` (``wait_closed()`` returns once it stopped)."""

    def __init__(self, config: MeterConfig):
        config.validate()
        super().__init__(config, MeterMetrics(), f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
        self.cap_bytes = config.cap
        self.reserved_bytes = 0
        self.remaining_bytes = config.cap
        self.window_remaining: int | None = None
        self.budget_forwarded = self.budget_outstanding = 0  # the budget's, every meter's, as last replayed
        self.listen_address: tuple[str, int] | None = None
        self.metrics_address: tuple[str, int] | None = None
        self._worker = LedgerWorker(self._open_ledger, on_commit=self.metrics.commit_seconds.observe)
        self._key = load_private_key(config.signing_key) if config.signing_key else None
        self._publisher = HeadPublisher(config.publish_heads) if config.publish_heads else None
        if self._publisher is not None and self._key is None:
            raise ConfigError("--publish-heads needs --signing-key: only signed heads are published")
        self._server: asyncio.base_events.Server | None = None
        self._metrics_server: asyncio.base_events.Server | None = None
        self._signed_size = -1
        self._stopped = asyncio.Event()
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
            await self._sign_head()  # a head at start: a ledger killed before its first interval is covered
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
        for t in [*self._tasks, self._rest_sign]:
            if t is not None:
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
        deadline = time.monotonic() + self.config.upstream_wait
        last: BaseException | None = None
        while True:
            try:
                t, _p = await asyncio.wait_for(connect_upstream(self.config.upstream, asyncio.Protocol),
                                               max(0.1, deadline - time.monotonic()))
                t.close()
                return
            except (OSError, ConfigError, asyncio.TimeoutError) as exc:
                last = exc
            if time.monotonic() >= deadline:
                reason = getattr(last, "strerror", None) or str(last) or type(last).__name__
                raise UpstreamUnavailable(
                    f"upstream {self.config.upstream} is unreachable ({reason}) after {self.config.upstream_wait:g}s; "
                    "start the inside worker first or fix --upstream"
                )
            await asyncio.sleep(0.1)

    # -- state -------------------------------------------------------------------------
    def _note_status(self, st: Any) -> None:
        self.cap_bytes = st.cap_bytes
        self.reserved_bytes = st.reserved_bytes
        self.remaining_bytes = st.remaining_bytes
        self.window_remaining = min((w["remaining_bytes"] for w in st.windows), default=None)
        self.budget_forwarded, self.budget_outstanding = st.forwarded_bytes, st.outstanding_bytes
        self.metrics.budget_forwarded.set(st.forwarded_bytes)
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
            # the same figures named for what they count (the budget's, every meter's; from the replayed log)
            "left_for_new_answers_bytes": self.effective_remaining(),
            "budget_forwarded_bytes": self.budget_forwarded,
            "budget_reserved_bytes": self.reserved_bytes,
            "budget_outstanding_bytes": self.budget_outstanding,
            "open_connections": len(self._conns),
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "timing_charged_bytes": self.charged,
            "outstanding_bytes": sum(c.holding()[0] for c in self._conns.values()),
            "unforwarded_reserved_bytes": sum(c.holding()[1] for c in self._conns.values()),
            "ledger_error": self.down_reason or None,
            "meter": self.meter_id,
            "loop": self.loop_name,
        }

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

