"""The outside's audit trail: every answer into the request log, through the anomaly monitor.

`Audit.wrap` sits between the inside connection and the API handler: it passes the token ids
through unchanged and, when the answer ends (done, failed or abandoned), appends (request,
seed, output ids, wire bytes) to the request log and scores bits per token. Alerts are appended
to the same log. `poll_budget` feeds the meter's count to the burn-rate alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from exfilguard.errors import EgressThrottled, ExfilguardError
from exfilguard.protocol.wire import GenerationRequest
from exfilguard.verify.alerts import Alert, AlertConfig, AnomalyMonitor, webhook_sender
from exfilguard.verify.requestlog import RequestLog

log = logging.getLogger(__name__)


@dataclass
class AuditConfig:
    """Where the outside logs answers and how it raises alerts (all optional)."""

    request_log: str | None = None
    fsync: bool = False
    # The outside's Ed25519 key that signs every line of the request log (verify/requestlog.py).
    # None: REQUEST_LOG.key next to the log, made on first use (keep it where the inside cannot read).
    log_key: str | None = None
    sign_log: bool = True
    alerts: AlertConfig | None = None
    meter_status_url: str | None = None  # the meter's GET /status, polled for the burn-rate alert
    budget_poll_s: float = 5.0


class Audit:
    """The request log and the anomaly monitor of one outside API."""

    def __init__(self, config: AuditConfig, prior: list[float] | None = None):
        self.config = config
        self.log = None
        if config.request_log:
            self.log = RequestLog(config.request_log, fsync=config.fsync,
                                  signing_key=log_signing_key(config) if config.sign_log else None)
        self.monitor = AnomalyMonitor(config.alerts or AlertConfig(), prior=prior)
        if self.log is not None:
            self.monitor.on_alert.append(self._log_alert)
        if self.monitor.config.webhook:
            self.monitor.on_alert.append(webhook_sender(self.monitor.config.webhook))
        self._poller: asyncio.Task[None] | None = None

    def _log_alert(self, alert: Alert) -> None:
        assert self.log is not None
        self.log.append_alert(alert.kind, alert.detail)

    def log_conn(self, hello_bytes: int) -> None:
        """A connection through the meter opened: its HELLO's bytes go in the log (never raises)."""
        if self.log is not None:
            try:
                self.log.append_conn(hello_bytes)
            except Exception:  # noqa: BLE001 - auditing must not break serving
                log.exception("request log: cannot record a connection")

    def check_admission(self) -> None:
        """EgressThrottled (429) while throttling is on and the budget burns too fast."""
        if self.monitor.throttled:
            raise EgressThrottled("the egress budget is burning faster than planned; new answers are throttled, retry later")

    async def wrap(self, tokens: AsyncIterator[list[int]], req: GenerationRequest, rid: str,
                   stats: dict[str, int]) -> AsyncIterator[list[int]]:
        """Pass `tokens` through; log and score the answer when it ends, however it ends."""
        ids: list[int] = []
        finish = "closed"  # the API stopped reading (stop string, EOS, client gone)
        try:
            async for chunk in tokens:
                ids.extend(chunk)
                yield chunk
            finish = "done"
        except ExfilguardError as exc:
            finish = exc.error_type
            raise
        finally:
            with contextlib.suppress(Exception):
                await tokens.aclose()  # type: ignore[attr-defined]
            self.record(req, rid, ids, stats.get("wire_bytes", 0), finish)

    def record(self, req: GenerationRequest, rid: str, ids: list[int], wire_bytes: int, finish: str) -> None:
        """Log one answer and score it (never raises: auditing must not break serving)."""
        try:
            if self.log is not None:
                self.log.append_request(rid, req.prompt_ids, req.seed, req.temperature, req.top_p, req.max_tokens,
                                        req.codec, ids, wire_bytes, finish)
            self.monitor.observe_answer(rid, len(ids), wire_bytes, req.temperature)
        except Exception:  # noqa: BLE001
            log.exception("request log / alert scoring failed")

    def observe_meter_status(self, status: dict[str, Any]) -> None:
        """Feed one meter status object (GET /status) to the burn-rate alert: bytes forwarded, not reserved."""
        from exfilguard.outside.budget import MeterFigures

        f = MeterFigures.from_status(status)
        if f is not None and f.cap is not None:
            self.monitor.observe_budget(f.forwarded, f.cap, left_bytes=f.cap_left)

    def start(self) -> None:
        """Start polling the meter for the burn-rate alert when a status URL is configured."""
        if self.config.meter_status_url and self._poller is None:
            self.start_budget_poller(http_status_fetcher(self.config.meter_status_url))

    def start_budget_poller(self, fetch: Callable[[], Awaitable[dict[str, Any] | None]]) -> None:
        """Poll the meter's status every budget_poll_s seconds (in the running loop)."""

        async def loop() -> None:
            while True:
                try:
                    st = await fetch()
                    if st:
                        self.observe_meter_status(st)
                except Exception as exc:  # noqa: BLE001
                    log.warning("meter status poll failed: %s", exc)
                await asyncio.sleep(self.config.budget_poll_s)

        self._poller = asyncio.get_running_loop().create_task(loop())

    def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self.log is not None:
            self.log.close()


def log_signing_key(config: AuditConfig) -> Any:
    """The key that signs the request log: config.log_key, else REQUEST_LOG.key (made on first use)."""
    from pathlib import Path

    from exfilguard.ledger.keys import load_private_key
    from exfilguard.ledger.keytools import generate_keypair

    assert config.request_log is not None
    path = Path(config.log_key) if config.log_key else Path(config.request_log + ".key")
    if config.log_key is None and not path.exists():
        generate_keypair(path)
        log.info("made %s (signs the request log; public key %s.pub for `exfilguard verify --log-key`)", path, path)
    return load_private_key(path)


def http_status_fetcher(url: str) -> Callable[[], Awaitable[dict[str, Any] | None]]:
    """Fetch the meter's status JSON from URL (None when it cannot be read)."""

    async def fetch() -> dict[str, Any] | None:
        import httpx

        async with httpx.AsyncClient(timeout=2.0) as c:
            r = await c.get(url)
        d = r.json()
        return d if isinstance(d, dict) else None

    return fetch
