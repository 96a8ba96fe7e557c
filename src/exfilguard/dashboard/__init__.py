"""exfilguard.dashboard: a read-only web page of the budgets, their burn, bits per token and the ledger's health.

Public API: ``create_dashboard_app(ledger_url, meter_metrics_url, ...)`` (a FastAPI app, for
``exfilguard up`` to mount or serve), ``DashboardConfig`` and ``serve_dashboard(config)``
(``exfilguard dashboard``), ``Collector`` (what the page shows, as a dict).
"""

from exfilguard.dashboard.app import app_from_config, create_dashboard_app, serve_dashboard
from exfilguard.dashboard.collect import Collector, DashboardConfig

__all__ = ["Collector", "DashboardConfig", "app_from_config", "create_dashboard_app", "serve_dashboard"]
