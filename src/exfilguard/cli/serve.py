"""CLI commands: inside, outside, up."""

from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command()
    def inside(
        strong: str = typer.Option("smollm2", help="strong model spec (smollm2, hf:PATH, openai:URL[?model=NAME])"),
        weak: Optional[str] = typer.Option(None, help="weak model spec (default: the shipped student)"),
        listen: str = typer.Option("127.0.0.1:9100", help="HOST:PORT to serve the protocol on"),
        device: str = typer.Option("cpu", help="torch device for a local strong model"),
        max_batch: int = typer.Option(64, help="most requests stepped together"),
    ) -> None:
        """Inside worker: generate with the strong model, stream weak-model-coded tokens."""
        from exfilguard.outside.stack import resolve_weak_spec, serve_inside

        serve_inside(strong, resolve_weak_spec(weak, strong), listen, device, max_batch)

    @app.command()
    def outside(
        inside: str = typer.Option(..., help="HOST:PORT of the meter in front of the inside worker"),
        weak: Optional[str] = typer.Option(None, help="weak model spec (must match the inside's)"),
        listen: str = typer.Option("127.0.0.1:8000", help="HOST:PORT for the OpenAI-compatible API"),
        api_keys: str = typer.Option(..., "--api-keys", help="file with one API key a line"),
        meter_status: Optional[str] = typer.Option(None, help="meter status URL (tells 429 from 503)"),
        codec: str = typer.Option("auto", help="codec the inside encodes with (auto: coupled if available, else model)"),
        flush_every: int = typer.Option(16, help="streaming answers: flush a chunk every N tokens (0: only at the end); non-streaming answers are one chunk"),
        flush_ms: float = typer.Option(0.0, help="streaming answers: also flush after T ms (0: off)"),
        model_name: str = typer.Option("smollm2", help="model id shown by /v1/models"),
        request_log: Optional[str] = typer.Option(None, help="append every answer (request, seed, output ids) to this JSONL log, for `exfilguard verify`"),
        budget_lifetime: Optional[str] = typer.Option(None, help="the budget's planned lifetime (e.g. 90d): alert when the meter's burn rate would spend the cap sooner (needs --meter-status)"),
        burn_window: str = typer.Option("1h", help="window of the burn-rate alert"),
        alert_webhook: Optional[str] = typer.Option(None, help="POST every alert as JSON to this URL"),
        throttle: bool = typer.Option(False, help="refuse new answers (429) while the budget burns faster than planned"),
    ) -> None:
        """Outside API: OpenAI-compatible, decodes what crosses the meter."""
        from exfilguard.meter.config import parse_duration
        from exfilguard.outside.app import OutsideConfig
        from exfilguard.outside.audit import AuditConfig
        from exfilguard.outside.stack import resolve_weak_spec, serve_outside
        from exfilguard.verify.alerts import AlertConfig

        cfg = OutsideConfig(model_name=model_name, codec=codec, flush_every=flush_every, flush_ms=flush_ms)
        alerts = AlertConfig(lifetime_s=parse_duration(budget_lifetime) if budget_lifetime else None,
                             burn_window_s=parse_duration(burn_window), throttle=throttle, webhook=alert_webhook)
        cfg.audit = AuditConfig(request_log=request_log, alerts=alerts, meter_status_url=meter_status)
        serve_outside(inside, resolve_weak_spec(weak, "smollm2"), listen, api_keys, meter_status, cfg)

    @app.command()
    def up(
        strong: str = typer.Option("smollm2", help="strong model spec"),
        weak: Optional[str] = typer.Option(None, help="weak model spec (default: the shipped student)"),
        cap: Optional[int] = typer.Option(None, help="egress cap in bytes (default: 10% of the strong weights)"),
        port: int = typer.Option(8000, help="port of the API on 127.0.0.1"),
        data_dir: str = typer.Option(".exfilguard", help="ledger and API keys live here"),
        codec: str = typer.Option("auto", help="codec the inside encodes with (auto: coupled if available, else model)"),
        flush_every: int = typer.Option(16, help="streaming answers: flush a chunk every N tokens (0: only at the end); non-streaming answers are one chunk"),
        flush_ms: float = typer.Option(0.0, help="streaming answers: also flush after T ms (0: off)"),
    ) -> None:
        """Start meter, inside and outside on localhost; print the base URL and an API key."""
        from exfilguard.outside.app import OutsideConfig
        from exfilguard.outside.stack import serve_up

        cfg = OutsideConfig(codec=codec, flush_every=flush_every, flush_ms=flush_ms)
        serve_up(strong, weak, cap, port, data_dir, cfg)
