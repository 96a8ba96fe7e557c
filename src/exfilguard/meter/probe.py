"""The kill switch: a write probe of the ledger every --health-interval, whether it is up or down.

A connection may hold a large reservation and forward for a long time without a ledger write;
this probe is what makes ``chmod a-w`` on the ledger (or a dead database) stop it within one
interval, and what lets the meter resume when the ledger can be written again.
"""

from __future__ import annotations

import asyncio
import logging
import time

from exfilguard.base_errors import LedgerUnavailable
from exfilguard.meter.proxy import LEDGER_FAILURES

log = logging.getLogger("exfilguard.meter")


class LedgerProbe:
    """Meter's probe loop (a mixin: it uses the Meter's worker, state and figures)."""

    async def _health_loop(self) -> None:
        """Probe the ledger with a write every health_interval; one slower than probe_timeout fails."""
        cfg = self.config
        last_status = 0.0
        while True:
            await asyncio.sleep(cfg.health_interval)
            try:
                down = self.state == "ledger_down"
                # While down, the probe writes a row: an empty transaction commits even on a full disk.
                probe = asyncio.ensure_future(self._worker.call(lambda led: led.ping(really=down)))
                try:
                    await asyncio.wait_for(asyncio.shield(probe), cfg.probe_timeout)
                except asyncio.TimeoutError:
                    probe.add_done_callback(lambda f: f.cancelled() or f.exception())
                    raise LedgerUnavailable(
                        f"ledger {cfg.ledger.split('@')[-1]} did not complete a write probe within {cfg.probe_timeout:g}s"
                    ) from None
                if down or time.monotonic() - last_status >= 1.0:
                    # The figures come from the replayed log, its row checked against it (never the row's word)
                    self._note_status(await self._worker.call(lambda led: led.checked_status(cfg.budget)))
                    last_status = time.monotonic()
                if down and self.state == "ledger_down":
                    self.down_reason = ""
                    self.metrics.ledger_up.set(1)
                    self._set_state("ok")
                    self._publish()
                    log.warning("ledger writable again; forwarding resumes")
            except LEDGER_FAILURES as exc:
                self._ledger_failed(exc)
            except Exception as exc:  # noqa: BLE001 - keep probing
                log.warning("ledger health check: %s", exc)
