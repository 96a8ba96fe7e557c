"""exfilguard.meter: the metered TCP proxy, the trusted base between inside and outside.

It imports no ML library and nothing from exfilguard.codec or exfilguard.models.

Public API: ``MeterConfig``, ``Meter`` (start/stop/status), ``run_meter(config, ready)`` and
``budget_status(ledger_url, budget)`` (remaining bytes, for telling 429 from 503).
"""

from exfilguard.ledger import BudgetStatus, Window, open_ledger
from exfilguard.meter.config import DEFAULT_BLOCK, MeterConfig, parse_duration, parse_size, parse_window
from exfilguard.meter.service import Meter, run_meter


def budget_status(ledger_url: str, budget: str | None = None) -> BudgetStatus:
    """Read one budget's totals from the ledger (read-only; raises LedgerUnavailable, ConfigError)."""
    led = open_ledger(ledger_url, create=False)
    try:
        return led.status(budget)
    finally:
        led.close()


__all__ = [
    "DEFAULT_BLOCK",
    "BudgetStatus",
    "Meter",
    "MeterConfig",
    "Window",
    "budget_status",
    "parse_duration",
    "parse_size",
    "parse_window",
    "run_meter",
]
