"""CLI: `exfilguard bench coupled` (logic in exfilguard.cli.benches.coupled)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def add_commands(bench: typer.Typer) -> None:
    """Add the `coupled` command to the `bench` sub-app."""

    @bench.command("coupled")
    def bench_coupled(
        strong: str = typer.Option(..., "--strong", help="Strong-model spec (e.g. smollm2)."),
        weak: str = typer.Option(..., "--weak", help="Weak-model spec (smollm2, default, ngram:PATH, ...)."),
        prompts: Path = typer.Option(Path("data/smollm2_corpus_dev_sample.jsonl"), "--prompts", help="JSONL file with prompt_ids (default: the 60-row dev sample in the repo)."),
        limit: int = typer.Option(5, "--limit", help="Distinct prompts to generate from."),
        max_tokens: int = typer.Option(64, "--max-tokens", help="Tokens to generate per prompt (at most)."),
        temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature (0: greedy)."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
        seed: int = typer.Option(0, "--seed", help="Base seed; prompt i uses seed + i."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """Generate with the strong model's seeded sampler; report model vs coupled bits/token,
        the KL bound, cross-entropy, agreement and a roundtrip check."""
        from exfilguard.cli.benches.coupled import CoupledBenchConfig, run

        cfg = CoupledBenchConfig(strong, weak, prompts, limit, max_tokens, temperature, top_p, seed)
        from exfilguard.cli.progress import progress_reporter

        with progress_reporter(as_json) as progress:
            result = run(cfg, progress)
        if as_json:
            keys = ("tokens", "codecs", "kl_bits_per_token", "cross_entropy_bits_per_token", "agreement")
            typer.echo(json.dumps({k: result[k] for k in keys}))
            return
        typer.echo(
            f"bench coupled: strong={strong} weak={weak} T={temperature} top_p={top_p}: "
            f"{result['generations']} generations, {result['tokens']} tokens"
        )
        for name, c in result["codecs"].items():
            typer.echo(f"  {name:8s} {c['bits_per_token']:7.3f} bits/token  roundtrip {'ok' if c['roundtrip_ok'] else 'FAILED'}")
        typer.echo(f"  KL(strong||weak)   {result['kl_bits_per_token']:7.3f} bits/token")
        typer.echo(f"  cross-entropy      {result['cross_entropy_bits_per_token']:7.3f} bits/token")
        typer.echo(f"  agreement          {result['agreement']:7.3f}")
