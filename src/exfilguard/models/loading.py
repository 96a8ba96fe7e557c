"""Which models a component loads, and loading them with a progress bar.

Importing this module loads no ML library: `resolve_weak_spec` and `weight_file_bytes` run in the
supervisor of `exfilguard up`, which must stay free of torch (it only checks files on disk)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The file that the `default` weak model's loader reads (models/exact_student.py, DEFAULT_EXACT_STUDENT);
# named here by path so that choosing the default needs no torch.
DEFAULT_WEAK_FILE = Path(__file__).resolve().parent.parent / "data" / "default_student" / "student_exact.npz"


def resolve_weak_spec(weak: str | None, strong: str) -> str:
    """The weak model to use: the one asked for, else the shipped `default` student if present,
    else the strong model itself (printed as a warning by the CLI)."""
    if weak:
        return weak
    if DEFAULT_WEAK_FILE.is_file():
        return "default"
    return "smollm2" if strong.startswith("openai:") else strong


def weight_file_bytes(strong_spec: str) -> int | None:
    """Size on disk of the strong model's weight files (None when unknown, e.g. openai:)."""
    if strong_spec == "smollm2":
        from exfilguard.models.specs import SMOLLM2_GGUF, smollm2_path

        return (smollm2_path() / SMOLLM2_GGUF).stat().st_size
    if strong_spec.startswith("hf:"):
        path = Path(strong_spec[3:].partition("?")[0])
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".gguf", ".pt")]
        return sum(p.stat().st_size for p in files) or None
    return None


def load_models(strong_spec: str | None, weak_spec: str, device: str = "cpu", progress: bool = True) -> tuple[Any, Any]:
    """Load the strong model (None for none) and the weak model, with a progress bar.

    An `openai:URL` strong spec is returned as the string (an upstream server: nothing to load).
    A weak spec equal to the strong spec reuses the loaded strong model (one copy in memory)."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from exfilguard.models import load_model

    steps = [s for s in (strong_spec, weak_spec if weak_spec != strong_spec else None) if s]
    strong = weak = None
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  disable=not progress, transient=False) as bar:
        task = bar.add_task("loading models", total=len(steps))
        if strong_spec:
            bar.update(task, description=f"loading strong model {strong_spec}")
            strong = strong_spec if strong_spec.startswith("openai:") else load_model(strong_spec, device=device)
            bar.advance(task)
        if weak_spec == strong_spec and strong is not None and not isinstance(strong, str):
            weak = strong
        else:
            bar.update(task, description=f"loading weak model {weak_spec}")
            weak = load_model(weak_spec)
            bar.advance(task)
        bar.update(task, description="models loaded")
    return strong, weak


def tokenizer_of(strong: Any, weak: Any) -> Any:
    """The tokenizer of the first loaded model that has one, else the shipped SmolLM2 tokenizer."""
    for m in (strong, weak):
        tok = getattr(m, "tokenizer", None)
        if tok is not None:
            return tok
    from exfilguard.models.hf import load_tokenizer

    return load_tokenizer()
