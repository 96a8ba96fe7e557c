"""CLI commands: bench codec, bench coupled (defined in cli/bench_coupled.py); their logic is in cli/benches/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from exfilguard.cli.progress import progress_reporter

bench = typer.Typer(help="Benchmarks that print figures (bits per token, tokens/s).", no_args_is_help=True)


@bench.command("codec")
def bench_codec(
    corpus: Path = typer.Option(Path("data/smollm2_corpus_dev_sample.jsonl"), "--corpus", help="JSONL corpus (the format of smollm2_corpus_dev.jsonl; default: the 60-row sample in the repo)."),
    weak: Optional[str] = typer.Option(None, "--weak", help="Weak-model spec for the model codec (e.g. smollm2)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Generations per temperature (default: all)."),
    codec: Optional[list[str]] = typer.Option(None, "--codec", help="Codecs to run (repeatable; default: all)."),
    flush_every: Optional[int] = typer.Option(None, "--flush-every", help="Tokens per chunk (default: one chunk)."),
    encoder: str = typer.Option("teacher-forced", "--encoder", help="Model-codec encoder: teacher-forced or incremental."),
    encode_threads: int = typer.Option(1, "--encode-threads", help="torch threads while encoding."),
    decode_threads: int = typer.Option(2, "--decode-threads", help="torch threads while decoding."),
    decode_limit: Optional[int] = typer.Option(
        None, "--decode-limit", help="Model codec: decode only the first N per temperature (decoding is slow)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Code every generation as its own stream, decode it, and report bits/token and speed."""
    from exfilguard.cli.benches.codec import BenchConfig, run

    cfg = BenchConfig(corpus, weak, limit, codec or None, flush_every, encoder, encode_threads, decode_threads, decode_limit)
    with progress_reporter(as_json) as progress:
        result = run(cfg, progress)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    from rich.console import Console

    _print_table(Console(), result)


def _print_table(console: "object", result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"bench codec: {result['generations']} generations, {result['tokens']} tokens, weak={result['weak']}")
    for col in ("T", "codec", "bits/token", "ideal", "roundtrip", "desyncs", "enc tok/s", "dec tok/s"):
        table.add_column(col, justify="right")
    sections = list(result["by_temperature"].items()) + [("all", result["all"])]
    for t, entry in sections:
        for name, c in entry["codecs"].items():
            ideal = c.get("ideal_bits_per_token")
            table.add_row(
                t,
                name,
                f"{c['bits_per_token']:.3f}",
                "" if ideal is None else f"{ideal:.3f}",
                "ok" if c["roundtrip_ok"] else f"{c['roundtrip_failures']} failed",
                str(c["desync_streams"]),
                f"{c['encode_tokens_per_s']:.0f}",
                f"{c['decode_tokens_per_s']:.0f}",
            )
    console.print(table)  # type: ignore[attr-defined]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    from exfilguard.cli.bench_coupled import add_commands

    add_commands(bench)
    app.add_typer(bench, name="bench")
