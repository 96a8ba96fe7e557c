"""CLI command: verify (re-run logged answers with a trusted strong model)."""

from __future__ import annotations

import json
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command()
    def verify(
        log: str = typer.Option(..., "--log", help="the outside's request log (JSONL, from `exfilguard outside --request-log`)"),
        strong: str = typer.Option(..., help="trusted replica of the strong model (spec: smollm2, hf:PATH, tiny-random)"),
        sample_rate: float = typer.Option(1.0, help="fraction of answers to re-run, chosen by a keyed hash the inside cannot predict"),
        sample_seed: Optional[int] = typer.Option(None, help="key of the sample (default: a fresh random one, printed)"),
        unseeded: bool = typer.Option(False, help="score every answer by likelihood, as if no seed had been shared"),
        max_gap: Optional[float] = typer.Option(None, help="flag a token this many logits below the model's choice (default: measured)"),
        max_z: Optional[float] = typer.Option(None, help="flag an unseeded answer with a likelihood z-score above this (default: measured)"),
        device: str = typer.Option("cpu", help="torch device for the strong model"),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
    ) -> None:
        """Re-run a sample of logged answers; flag those the strong model does not reproduce (exit 12)."""
        from dataclasses import replace

        from exfilguard.errors import VerificationFailed
        from exfilguard.models import load_model
        from exfilguard.verify.requestlog import read_log
        from exfilguard.verify.scoring import Thresholds
        from exfilguard.verify.verifier import VerifyConfig, verify_log

        th = Thresholds()
        if max_gap is not None:
            th = replace(th, max_gap=max_gap)
        if max_z is not None:
            th = replace(th, max_z=max_z)
        cfg = VerifyConfig(sample_rate=sample_rate, sample_seed=sample_seed, thresholds=th, unseeded=unseeded)
        cfg.validate()
        for _ in read_log(log):  # a corrupt log is reported before the model is loaded
            pass
        model = load_model(strong, device=device)
        report = verify_log(log, model, cfg, progress=not as_json)
        if as_json:
            print(json.dumps(report.as_dict()))
        else:
            from rich.console import Console
            from rich.table import Table

            t = Table(title=f"verify {log}: {len(report.scores)} of {report.records} answers re-run "
                      f"(sample rate {report.sample_rate:g}, sample seed {report.sample_seed})")
            for col in ("seq", "id", "method", "tokens", "flips", "max gap", "z", "verdict"):
                t.add_column(col)
            for s in report.scores:
                t.add_row(str(s.seq), s.id, s.method, str(s.tokens), str(s.flips),
                          f"{s.max_gap:.3g}", "" if s.z is None else f"{s.z:.2f}",
                          f"[red]FLAGGED[/red] {s.reason}" if s.flagged else "ok")
            c = Console()
            c.print(t)
            for a in report.alerts:
                c.print(f"[yellow]alert in log[/yellow] seq {a['seq']}: {a['kind']}")
        if report.flagged:
            raise VerificationFailed(f"{len(report.flagged)} of {len(report.scores)} re-run answers were flagged "
                                     "(see the scores); investigate the inside")
