"""CLI commands: meter."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command()
    def meter(
        listen: str = typer.Option(..., "--listen", help="HOST:PORT the outside connects to."),
        upstream: str = typer.Option(..., "--upstream", help="HOST:PORT of the inside worker, or unix:PATH (a UNIX socket; a symlink is refused)."),
        ledger: str = typer.Option(..., "--ledger", help="Ledger URL: sqlite:///PATH or postgresql://USER@HOST:PORT/DB."),
        cap: str = typer.Option(..., "--cap", help="Total bytes that may ever leave (e.g. 10GB, 500MiB). Fixed once the budget exists."),
        budget: str = typer.Option("default", "--budget", help="Budget name (meters that share a name share the cap)."),
        window: Optional[list[str]] = typer.Option(None, "--window", help="Rolling window DURATION=BYTES, e.g. 1h=50MB (repeatable)."),
        reserve_block: str = typer.Option(
            "16MiB", "--reserve-block",
            help="Largest reservation block (the ceiling of adaptive sizing; equal to --min-block for a fixed block). "
                 "A crash over-counts at most two blocks per open connection.",
        ),
        min_block: str = typer.Option("4KiB", "--min-block", help="First reservation block of a connection, and what an idle one keeps."),
        settle_idle: float = typer.Option(1.0, "--settle-idle", help="Seconds without traffic before a connection settles what it used."),
        signing_key: Optional[Path] = typer.Option(None, "--signing-key", help="Ed25519 key (from `exfilguard keys new`) that signs tree heads."),
        metrics: Optional[str] = typer.Option(None, "--metrics", help="HOST:PORT for Prometheus /metrics and JSON /status."),
        sth_interval: float = typer.Option(30.0, "--sth-interval", help="Seconds between signed tree heads."),
        upstream_wait: float = typer.Option(5.0, "--upstream-wait", help="Seconds to wait for the upstream at start (0: don't check)."),
        publish_heads: Optional[str] = typer.Option(
            None, "--publish-heads",
            help="Also publish every signed tree head outside the ledger: a DIR (one JSON file each), an http(s) URL (POST) or - (stdout).",
        ),
        timing_charge: bool = typer.Option(
            False, "--timing-charge",
            help="Count timing as egress: charge every connection open and close and every short upstream read a fixed "
                 "minimum in the ledger (docs/meter.md states the bound).",
        ),
        loop: str = typer.Option("auto", "--loop", help="Event loop: auto (uvloop if installed), asyncio or uvloop."),
        log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
    ) -> None:
        """Run the metered proxy: every byte from upstream to client is reserved in the ledger first."""
        import asyncio
        import logging
        import signal

        from exfilguard.meter import Meter, MeterConfig
        from exfilguard.units import parse_size, parse_window
        from exfilguard.meter import loop as event_loop

        logging.basicConfig(
            level=getattr(logging, log_level.upper(), logging.INFO),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        cfg = MeterConfig(
            listen=listen,
            upstream=upstream,
            ledger=ledger,
            cap=parse_size(cap, "--cap"),
            budget=budget,
            windows=tuple(parse_window(w) for w in window or ()),
            reserve_block=parse_size(reserve_block, "--reserve-block"),
            min_block=parse_size(min_block, "--min-block"),
            settle_idle=settle_idle,
            signing_key=signing_key,
            metrics=metrics,
            sth_interval=sth_interval,
            upstream_wait=upstream_wait,
            publish_heads=publish_heads,
            timing_charge=timing_charge,
        )

        async def main() -> None:
            m = Meter(cfg)
            await m.start()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, lambda: asyncio.ensure_future(m.stop()))
            await m.wait_closed()

        event_loop.run(main(), loop)
