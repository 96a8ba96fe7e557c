"""CLI commands: distill."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class Kind(str, Enum):
    ngram = "ngram"
    student = "student"
    exact = "exact"


class Size(str, Enum):
    tiny = "tiny"
    small = "small"
    medium = "medium"


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command()
    def distill(
        corpus: list[Path] = typer.Option([], "--corpus", help="JSON-lines corpus (prompt_ids, token_ids; .gz ok). Repeat for more files."),
        kind: Kind = typer.Option(..., "--kind", help="ngram: integer Kneser-Ney counts; student: a small transformer; exact: quantise the float student --from into an exact (integer) one."),
        from_student: Path | None = typer.Option(None, "--from", help="--kind exact: the float student .npz to quantise."),
        out: Path = typer.Option(..., "--out", help="Where to write the weak model (.npz)."),
        strong: str = typer.Option("smollm2", "--strong", help="Strong-model spec: teacher logits (KL) and --generate samples."),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
        size: Size = typer.Option(Size.medium, "--size", help="Student size (small trains on CPU)."),
        generate: int = typer.Option(0, "--generate", help="Sample N more strong-model generations from the corpus prompts first."),
        steps: int = typer.Option(2000, "--steps", help="Student optimizer steps."),
        batch_size: int = typer.Option(32, "--batch-size", help="Generations per student step."),
        lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate (cosine decay)."),
        kl: float = typer.Option(0.7, "--kl", help="Weight of KL(strong || student); 0 trains on generated tokens only, without loading the strong model."),
        order: int = typer.Option(4, "--order", help="n-gram order."),
        seed: int = typer.Option(0, "--seed", help="Seed for init, batch order and generation."),
        limit: int = typer.Option(0, "--limit", help="Use only the first N corpus rows (0: all)."),
        eval_path: Path | None = typer.Option(None, "--eval", help="Dev corpus: print bits/token of the result per temperature."),
        checkpoint_every: int = typer.Option(200, "--checkpoint-every", help="Steps between resumable checkpoints (OUT.ckpt)."),
        stop_after: int = typer.Option(0, "--stop-after", help="End this run after N steps, keeping the checkpoint (0: run to the end)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
    ) -> None:
        """Make a weak model that imitates the strong one: an n-gram or a student transformer."""
        from exfilguard.models import distill as d

        if kind is Kind.exact:
            from exfilguard.errors import ConfigError
            from exfilguard.models.exact_student import load_exact_student, quantize_student
            from exfilguard.models.student import load_student

            if from_student is None:
                raise ConfigError("--kind exact needs --from FLOAT_STUDENT.npz (post-training quantisation)")
            quantize_student(from_student, out)
            result = load_exact_student(out)
            typer.echo(f"wrote {out}: exact student from {from_student}, fingerprint {result.info.short_fingerprint}")
            if eval_path is not None:
                dev = d.read_corpus([eval_path])
                typer.echo(d.format_table(d.evaluate([load_student(from_student), result], dev, progress=progress)))
            return
        if not corpus:
            from exfilguard.errors import ConfigError

            raise ConfigError(f"--kind {kind.value} needs at least one --corpus file")
        rows = d.read_corpus(corpus, limit or None)
        typer.echo(f"corpus: {len(rows)} generations, {sum(len(r.token_ids) for r in rows)} tokens")
        out.parent.mkdir(parents=True, exist_ok=True)
        teacher = None
        need_teacher = generate > 0 or (kind is Kind.student and kl > 0)
        if need_teacher:
            from exfilguard.models import load_model

            typer.echo(f"loading strong model {strong} on {device} ...")
            teacher = load_model(strong, device=device)
            if not hasattr(teacher, "model"):
                raise typer.BadParameter(f"--strong {strong}: distillation needs a local transformers model")
        if generate > 0:
            cache = out.with_name(out.name + f".gen{generate}-s{seed}.jsonl.gz")
            if cache.is_file():
                extra = d.read_corpus([cache])
                typer.echo(f"reusing {len(extra)} generations from {cache}")
            else:
                prompts = sorted({r.prompt_ids for r in rows})
                extra = d.generate_rows(teacher, prompts, generate, seed=seed, batch_size=256 if device.startswith("cuda") else 8, progress=progress)
                d.write_corpus(extra, cache)
            rows = rows + extra
            typer.echo(f"with generated: {len(rows)} generations, {sum(len(r.token_ids) for r in rows)} tokens")
        if kind is Kind.ngram:
            from exfilguard.models.ngram import load_ngram, train_ngram

            model = train_ngram(((r.prompt_ids, r.token_ids) for r in rows), order=order)
            model.save(out)
            result = load_ngram(out)
            typer.echo(f"wrote {out}: order {order}, fingerprint {result.info.short_fingerprint}")
        else:
            from exfilguard.models.student import load_student

            cfg = d.TrainConfig(size=size.value, steps=steps, batch_size=batch_size, lr=lr, kl_weight=kl, seed=seed, checkpoint_every=checkpoint_every)
            stats = d.train_student(rows, out, cfg, teacher=teacher if kl > 0 else None, device=device, progress=progress, log=typer.echo, stop_after=stop_after or None)
            if not stats["done"]:
                return
            result = load_student(out)
            typer.echo(
                f"wrote {out}: {stats['params'] / 1e6:.1f}M params, {stats['steps']} steps in {stats['seconds']:.0f} s, "
                f"final loss {sum(stats['losses'][-20:]) / max(len(stats['losses'][-20:]), 1):.3f}, fingerprint {result.info.short_fingerprint}"
            )
        if eval_path is not None:
            dev = d.read_corpus([eval_path])
            typer.echo(d.format_table(d.evaluate([result], dev, progress=progress)))
