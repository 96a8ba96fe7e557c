"""CLI commands: dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command()
    def dashboard(
        ledger: str = typer.Option(..., "--ledger", help="Ledger URL: sqlite:///PATH or postgresql://..."),
        meter_metrics: Optional[str] = typer.Option(None, "--meter-metrics", help="The meter's Prometheus URL (http://HOST:PORT/metrics): denials and alerts."),
        tokens_metrics: Optional[str] = typer.Option(None, "--tokens-metrics", help="A Prometheus URL with a tokens-served counter (the outside API's /metrics): bits per token."),
        public_key: Optional[list[Path]] = typer.Option(None, "--public-key", help="Public key (FILE.pub) of a meter, to check signed tree heads (repeatable)."),
        listen: str = typer.Option("127.0.0.1:8050", "--listen", help="HOST:PORT to serve the page on."),
        refresh: float = typer.Option(3.0, "--refresh", help="Seconds between the page's refreshes."),
        verify_every: float = typer.Option(30.0, "--verify-every", help="Seconds between full ledger verifications."),
    ) -> None:
        """Serve a read-only page: per budget cap, used, burn rate, bits per token, denials, verification."""
        from exfilguard.dashboard import DashboardConfig, serve_dashboard

        serve_dashboard(DashboardConfig(
            ledger_url=ledger, meter_metrics_url=meter_metrics, tokens_metrics_url=tokens_metrics,
            public_keys=tuple(public_key or ()), listen=listen, refresh_seconds=refresh, verify_every=verify_every,
        ))
