"""`exfilguard bench coupled`: generate with the strong model's seeded sampler, then code the
same generations with the `model` and `coupled` codecs and compare with the KL bound.

Per generation: the strong model samples incrementally (KV cache) with
codec.gumbel.sample_token and seed = base seed + prompt index; each codec encodes the tokens as
one stream (every byte counted: header, chunk, end record) and decodes it back. Ideal figures
use the weak model's teacher-forced pass (measurement only, never coding):
  kl            sum over positions of KL(p_T || q_T) (T = 0: the untempered distributions)
  cross_entropy sum of -log2 q_T(x) of the generated tokens (T = 0: untempered)
  agreement     tokens equal to the weak model's perturbed argmax (what coupled codes cheaply)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exfilguard.codec.codecs import ModelCodec
from exfilguard.codec.coupled import CoupledCodec
from exfilguard.codec.gumbel import sample_token, tempered_logprobs, validate_seed
from exfilguard.codec.stream import decode_stream, encode_stream
from exfilguard.errors import ConfigError, FrameCorrupt

_LOG2E = 1.0 / np.log(2.0)


@dataclass
class CoupledBenchConfig:
    strong: str
    weak: str
    prompts: Path
    limit: int = 5
    max_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0


def load_prompts(path: Path, limit: int) -> list[list[int]]:
    """The first `limit` distinct prompts (field prompt_ids) of a JSONL corpus file."""
    if not path.is_file():
        raise ConfigError(f"no prompts file {path}")
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    with path.open() as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                ids = [int(t) for t in json.loads(line)["prompt_ids"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path}:{n}: expected a JSON object with prompt_ids ({exc})") from None
            if ids and tuple(ids) not in seen:
                seen.add(tuple(ids))
                out.append(ids)
                if len(out) >= limit:
                    break
    return out


def generate(strong: Any, prompt: Sequence[int], cfg: CoupledBenchConfig, seed: int) -> tuple[list[int], np.ndarray]:
    """The strong model's seeded generation and its logits before each token (float32)."""
    sess = strong.session(list(prompt))
    eos = set(strong.info.eos_token_ids)
    toks: list[int] = []
    rows: list[np.ndarray] = []
    for pos in range(cfg.max_tokens):
        logits = np.array(sess.logits(), dtype=np.float32)
        tok = sample_token(logits, cfg.temperature, cfg.top_p, seed, pos)
        toks.append(tok)
        rows.append(logits)
        if tok in eos:
            break
        sess.feed(tok)
    return toks, np.stack(rows)


def _ideal(strong_logits: np.ndarray, weak_logits: np.ndarray, toks: Sequence[int], t: float, top_p: float) -> tuple[float, float]:
    """(KL bits, cross-entropy bits) summed over the generation."""
    kl = ce = 0.0
    temp = t if t > 0 else 1.0
    for i, tok in enumerate(toks):
        lp = tempered_logprobs(strong_logits[i], temp, top_p if t > 0 else 1.0)
        lq = tempered_logprobs(weak_logits[i], temp)
        p = np.exp(lp)
        m = p > 0
        kl += float((p[m] * (lp[m] - lq[m])).sum()) * _LOG2E
        ce += float(-lq[tok]) * _LOG2E
    return kl, ce


def generate_all(
    strong: Any, prompts: Sequence[Sequence[int]], cfg: CoupledBenchConfig, progress: Callable[[str, int, int], None] | None = None
) -> list[tuple[list[int], np.ndarray, int]]:
    """(tokens, strong logits, seed) of each prompt's seeded generation (seed = cfg.seed + i)."""
    base_seed = validate_seed(cfg.seed)
    out = []
    for i, prompt in enumerate(prompts):
        seed = (base_seed + i) % (1 << 64)
        toks, logits = generate(strong, prompt, cfg, seed)
        out.append((toks, logits, seed))
        if progress is not None:
            progress("generating", i + 1, len(prompts))
    return out


def run(
    cfg: CoupledBenchConfig,
    progress: Callable[[str, int, int], None] | None = None,
    *,
    strong: Any = None,
    weak: Any = None,
    generations: list[tuple[list[int], np.ndarray, int]] | None = None,
) -> dict[str, Any]:
    """Generate, code with `model` and `coupled`, decode, and report (the --json object).

    `strong`, `weak` and `generations` (from generate_all on the same prompts and cfg) may be
    passed in so that one process compares several weak models on the same generations
    (bench/coupled_matrix.py)."""
    from exfilguard.models.specs import load_model

    validate_seed(cfg.seed)
    prompts = load_prompts(cfg.prompts, cfg.limit)
    if not prompts:
        raise ConfigError(f"{cfg.prompts} holds no prompts")
    if generations is None and strong is None:
        strong = load_model(cfg.strong)
    if weak is None:
        weak = strong if cfg.weak == cfg.strong and strong is not None else load_model(cfg.weak)
    if strong is not None and weak.vocab_size != strong.vocab_size:
        raise ConfigError("the weak model must share the strong model's tokenizer (vocab sizes differ)")
    model_codec = ModelCodec(weak)
    coupled = CoupledCodec(weak)
    bits = {"model": 0, "coupled": 0}
    ok = {"model": True, "coupled": True}
    secs = {"generate": 0.0, "model": 0.0, "coupled": 0.0}
    tokens = 0
    kl = ce = 0.0
    if generations is None:
        t0 = time.perf_counter()
        generations = generate_all(strong, prompts, cfg, progress)
        secs["generate"] = time.perf_counter() - t0
    for i, (prompt, (toks, strong_logits, seed)) in enumerate(zip(prompts, generations)):
        tokens += len(toks)
        k, c = _ideal(strong_logits, weak.score_fast(prompt, toks), toks, cfg.temperature, cfg.top_p)
        kl, ce = kl + k, ce + c
        for name in ("model", "coupled"):
            t0 = time.perf_counter()
            codec = model_codec if name == "model" else coupled.for_request(seed, cfg.temperature, cfg.top_p)
            data = encode_stream(codec, toks, prompt)
            bits[name] += 8 * len(data)
            try:
                ok[name] &= decode_stream(codec, data, prompt) == toks
            except FrameCorrupt:  # Desync included: the bench counts it as a failed round trip
                ok[name] = False
            secs[name] += time.perf_counter() - t0
        if progress is not None:
            progress("coding", i + 1, len(prompts))
    n = max(tokens, 1)
    return {
        "tokens": tokens,
        "generations": len(prompts),
        "strong": cfg.strong,
        "weak": cfg.weak,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "codecs": {name: {"bits_per_token": bits[name] / n, "roundtrip_ok": ok[name]} for name in ("model", "coupled")},
        "kl_bits_per_token": kl / n,
        "cross_entropy_bits_per_token": ce / n,
        "agreement": coupled.stats.agreements / n,
        "seconds": secs,
    }
