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
        strong: Optional[str] = typer.Option(None, help="trusted replica of the strong model (spec: smollm2, hf:PATH, tiny-random): re-run a sample of the answers"),
        ledger: Optional[str] = typer.Option(None, "--ledger", help="the meter's ledger URL: the logged answers' bytes must explain every byte it forwarded (exit 13 if not)"),
        budget: Optional[str] = typer.Option(None, "--budget", help="the meter's budget in that ledger (default: the only one)"),
        log_key: Optional[str] = typer.Option(None, "--log-key", help="the outside's public key (LOG.key.pub): every line's signature must verify (default: LOG.key.pub if it is there)"),
        tolerance: int = typer.Option(0, "--tolerance", help="bytes the reconciliation may be off by (answers in flight while the stack runs)"),
        timing_charged: int = typer.Option(0, "--timing-charged", help="bytes a meter run with --timing-charge counted besides frames (its exfilguard_meter_timing_charged_bytes_total, summed over its runs)"),
        sample_rate: float = typer.Option(1.0, help="fraction of answers to re-run, chosen by a keyed hash the inside cannot predict"),
        sample_seed: Optional[int] = typer.Option(None, help="key of the sample (default: a fresh random one, printed)"),
        unseeded: bool = typer.Option(False, help="score every answer by likelihood, as if no seed had been shared"),
        max_gap: Optional[float] = typer.Option(None, help="flag a token this many logits below the model's choice (default: measured)"),
        max_z: Optional[float] = typer.Option(None, help="flag an unseeded answer with a likelihood z-score above this (default: measured)"),
        device: str = typer.Option("cpu", help="torch device for the strong model"),
        as_json: bool = typer.Option(False, "--json", help="print JSON"),
    ) -> None:
        """Check the request log's chain and signatures, reconcile it with the meter's ledger (exit 13), and
        re-run a sample of its answers with a trusted strong model (exit 12 for flagged answers)."""
        from dataclasses import replace
        from pathlib import Path

        from exfilguard.errors import ConfigError, VerificationFailed
        from exfilguard.ledger.keytools import load_public_key
        from exfilguard.verify.requestlog import read_log
        from exfilguard.verify.scoring import Thresholds
        from exfilguard.verify.verifier import VerifyConfig, verify_log

        if strong is None and ledger is None:
            raise ConfigError("give --strong (re-run answers), --ledger (reconcile bytes with the meter), or both")
        pub = None
        default_pub = Path(log + ".key.pub")
        if log_key is not None:
            pub = load_public_key(Path(log_key))
        elif default_pub.is_file():
            pub = load_public_key(default_pub)
            if not as_json:
                print(f"note: checking signatures with {default_pub}, found next to the log; pin the outside's "
                      "public key with --log-key (whoever can rewrite the log may replace a key beside it)")
        elif not as_json:
            print("note: no --log-key and no LOG.key.pub: line signatures are not checked, only the hash chain")
        for _ in read_log(log, pub):  # a corrupt log is reported before anything else runs
            pass
        rec = None
        if ledger is not None:
            from exfilguard.verify.reconcile import reconcile

            rec = reconcile(log, ledger, budget, pub, tolerance, timing_charged)
            if not as_json:
                print(f"reconciled: the meter forwarded {rec.ledger_forwarded} B; the log explains {rec.logged_bytes} B "
                      f"({rec.answers} answers, {rec.connections} connections); unexplained {rec.unexplained} B")
        if strong is None:
            if as_json:
                print(json.dumps({"reconciliation": rec.as_dict() if rec else None}))
            return
        from exfilguard.models import load_model

        th = Thresholds()
        if max_gap is not None:
            th = replace(th, max_gap=max_gap)
        if max_z is not None:
            th = replace(th, max_z=max_z)
        cfg = VerifyConfig(sample_rate=sample_rate, sample_seed=sample_seed, thresholds=th, unseeded=unseeded)
        cfg.validate()
        model = load_model(strong, device=device)
        report = verify_log(log, model, cfg, progress=not as_json, public_key=pub)
        if as_json:
            print(json.dumps({**report.as_dict(), "reconciliation": rec.as_dict() if rec else None}))
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
