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
        api_keys: Optional[str] = typer.Option(None, "--api-keys", help="file with one API key a line (no budgets of their own)"),
        keys_ledger: Optional[str] = typer.Option(None, "--keys-ledger", help="ledger URL of API keys with budgets (exfilguard keys add)"),
        meter_status: Optional[str] = typer.Option(None, help="meter status URL (tells 429 from 503)"),
        codec: str = typer.Option("auto", help="codec the inside encodes with (auto: coupled if available, else model)"),
        flush_every: int = typer.Option(16, help="streaming answers: flush a chunk every N tokens (0: only at the end); non-streaming answers are one chunk"),
        flush_ms: float = typer.Option(0.0, help="streaming answers: also flush after T ms (0: off)"),
        model_name: str = typer.Option("smollm2", help="model id shown by /v1/models"),
        max_context: int = typer.Option(8192, help="the strong model's context in tokens (prompt + answer); longer requests get 400"),
    ) -> None:
        """Outside API: OpenAI-compatible, decodes what crosses the meter."""
        from exfilguard.outside.app import OutsideConfig
        from exfilguard.outside.stack import resolve_weak_spec, serve_outside

        cfg = OutsideConfig(model_name=model_name, codec=codec, flush_every=flush_every, flush_ms=flush_ms,
                            keys_ledger=keys_ledger, meter_status_url=meter_status, max_context=max_context)
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
