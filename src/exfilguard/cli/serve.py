"""CLI commands: inside, outside, up."""

from __future__ import annotations

from pathlib import Path
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
        from exfilguard.inside.serve import serve_inside
        from exfilguard.models.loading import resolve_weak_spec

        serve_inside(strong, resolve_weak_spec(weak, strong), listen, device, max_batch)

    @app.command()
    def outside(
        inside: str = typer.Option(..., help="HOST:PORT of the meter in front of the inside worker"),
        weak: Optional[str] = typer.Option(None, help="weak model spec (must match the inside's)"),
        listen: str = typer.Option("127.0.0.1:8000", help="HOST:PORT for the OpenAI-compatible API"),
        api_keys: Optional[str] = typer.Option(None, "--api-keys", help="file with one API key a line (no budgets of their own)"),
        keys_ledger: Optional[str] = typer.Option(None, "--keys-ledger", help="ledger URL of API keys with budgets (exfilguard keys add)"),
        meter_status: Optional[str] = typer.Option(None, help="meter status URL (tells 429 from 503)"),
        codec: str = typer.Option("auto", help="codec the inside encodes with (auto: coupled if available, else model)"),
        flush_every: int = typer.Option(16, help="streaming answers: flush a chunk every N tokens (0: only at the end); non-streaming answers are one chunk"),
        flush_ms: float = typer.Option(0.0, help="streaming answers: also flush after T ms (0: off)"),
        model_name: str = typer.Option("smollm2", help="model id shown by /v1/models"),
        max_context: int = typer.Option(8192, help="the strong model's context in tokens (prompt + answer); longer requests get 400"),
        request_log: Optional[str] = typer.Option(None, help="append every answer (request, seed, output ids) to this JSONL log, for `exfilguard verify`"),
        access_log: Optional[str] = typer.Option(None, "--access-log", help="append the access log (one JSON line per request) to this file (default: stderr)"),
        budget_lifetime: Optional[str] = typer.Option(None, help="the budget's planned lifetime (e.g. 90d): alert when the meter's burn rate would spend the cap sooner (needs --meter-status)"),
        burn_window: str = typer.Option("1h", help="window of the burn-rate alert"),
        alert_webhook: Optional[str] = typer.Option(None, help="POST every alert as JSON to this URL"),
        throttle: bool = typer.Option(False, help="refuse new answers (429) while the budget burns faster than planned"),
    ) -> None:
        """Outside API: OpenAI-compatible, decodes what crosses the meter."""
        from exfilguard.units import parse_duration
        from exfilguard.outside.app import OutsideConfig
        from exfilguard.outside.audit import AuditConfig
        from exfilguard.models.loading import resolve_weak_spec
        from exfilguard.outside.serve import serve_outside
        from exfilguard.verify.alerts import AlertConfig

        cfg = OutsideConfig(model_name=model_name, codec=codec, flush_every=flush_every, flush_ms=flush_ms,
                            keys_ledger=keys_ledger, meter_status_url=meter_status, max_context=max_context,
                            access_log_file=access_log)
        alerts = AlertConfig(lifetime_s=parse_duration(budget_lifetime) if budget_lifetime else None,
                             burn_window_s=parse_duration(burn_window), throttle=throttle, webhook=alert_webhook)
        cfg.audit = AuditConfig(request_log=request_log, alerts=alerts, meter_status_url=meter_status)
        serve_outside(inside, resolve_weak_spec(weak, "smollm2"), listen, api_keys, meter_status, cfg)

    @app.command()
    def up(
        strong: str = typer.Option("smollm2", help="strong model spec"),
        weak: Optional[str] = typer.Option(None, help="weak model spec (default: the shipped student)"),
        cap: Optional[str] = typer.Option(None, help="egress cap in bytes, e.g. 5000, 50MB (default: 10% of the strong weights)"),
        port: int = typer.Option(8000, help="port of the API (on --host)"),
        host: str = typer.Option("127.0.0.1", "--host", help="address the API and the dashboard listen on (0.0.0.0: every interface)"),
        data_dir: str = typer.Option(".exfilguard", help="ledger, meter key and API keys live here"),
        ledger: Optional[str] = typer.Option(None, "--ledger", help="Ledger URL (default: sqlite:///DATA_DIR/ledger.sqlite)."),
        reserve_block: Optional[str] = typer.Option(None, "--reserve-block", help="Largest block the meter reserves per ledger commit (blocks adapt from 4 KiB up to it; default 16MiB); a crash can leave at most two blocks per open connection counted but unused."),
        window: Optional[list[str]] = typer.Option(None, "--window", help="Rolling window DURATION=BYTES, e.g. 1h=50MB (repeatable)."),
        signing_key: Optional[Path] = typer.Option(None, "--signing-key", help="Ed25519 key that signs tree heads (default: DATA_DIR/meter-key, made on first use)."),
        metrics: Optional[str] = typer.Option(None, "--metrics", help="HOST:PORT of the meter's /metrics and /status, fixed for Prometheus (default 127.0.0.1:9464; a free port, printed, if that is taken)."),
        publish_heads: Optional[str] = typer.Option(None, "--publish-heads", help="Where the meter publishes every signed head: DIR, http(s) URL or - (default: DATA_DIR/heads, which the inside cannot see)."),
        codec: str = typer.Option("auto", help="codec the inside encodes with (auto: coupled if available, else model)"),
        flush_every: int = typer.Option(16, help="streaming answers: flush a chunk every N tokens (0: only at the end); non-streaming answers are one chunk"),
        flush_ms: float = typer.Option(0.0, help="streaming answers: also flush after T ms (0: off)"),
        device: str = typer.Option("cpu", help="torch device for a local strong model"),
        dashboard_port: Optional[int] = typer.Option(None, "--dashboard-port", help="port of the read-only operator dashboard on --host (default 8050, or a free port, printed, if that is taken; 0: none)"),
        budget_lifetime: Optional[str] = typer.Option(None, "--budget-lifetime", help="the budget's planned lifetime (e.g. 90d): the outside alerts when the burn rate would spend the cap sooner"),
        access_log: Optional[str] = typer.Option(None, "--access-log", help="the outside's access log, one JSON line per request (default: DATA_DIR/access.jsonl)"),
        timing_charge: bool = typer.Option(True, "--timing-charge/--no-timing-charge", help="the meter charges every connection's open and close and every short read a fixed minimum, so timing counts as egress (off: the ledger counts exactly the bytes forwarded)"),
        no_isolate: bool = typer.Option(False, "--no-isolate", help="run the inside unsandboxed (it could then read the ledger and the keys and kill the meter); for hosts without bwrap or namespaces"),
    ) -> None:
        """Start meter, inside and outside as three supervised processes; print the base URL, an API key and the meter's status URL."""
        from exfilguard.supervise import new_api_key, serve_up, up_config

        cfg = up_config(
            strong, weak, cap, port, data_dir, ledger=ledger, reserve_block=reserve_block, windows=window,
            signing_key=signing_key, metrics=metrics, publish_heads=publish_heads, codec=codec,
            flush_every=flush_every, flush_ms=flush_ms, device=device, dashboard_port=dashboard_port, host=host,
            isolate=not no_isolate, budget_lifetime=budget_lifetime, access_log=access_log, timing_charge=timing_charge,
        )
        serve_up(cfg, new_api_key(cfg.data_dir))
