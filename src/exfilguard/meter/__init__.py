"""exfilguard.meter: the metered TCP proxy, the trusted base between inside and outside.

It imports no ML library and nothing from exfilguard.codec or exfilguard.models.

Public API: ``MeterConfig`` and ``Meter`` (start/stop/wait_closed/status). A
budget's totals for other components: ``exfilguard.ledger.reads.budget_status``; the parsers of
command-line sizes and durations: ``exfilguard.units``.
"""

from exfilguard.ledger.accounting import Window
from exfilguard.meter.config import DEFAULT_BLOCK, MeterConfig
from exfilguard.meter.service import Meter

__all__ = ["DEFAULT_BLOCK", "Meter", "MeterConfig", "Window"]
