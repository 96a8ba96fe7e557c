"""A fake weak model with random (seeded) logits: fast, deterministic, any vocabulary size."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from exfilguard.models.base import LanguageModel, ModelInfo, Session


def _row(seed: int, context: Sequence[int], vocab: int, sharp: float) -> np.ndarray:
    h = hashlib.sha256(f"{seed}:{list(context)[-3:]}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(h[:8], "little"))
    return (rng.standard_normal(vocab) * sharp).astype(np.float32)


class FakeSession(Session):
    def __init__(self, model: "FakeModel", prefix: Sequence[int]):
        self.m = model
        self.ctx = list(prefix)

    def logits(self) -> np.ndarray:
        row = _row(self.m.seed, self.ctx, self.m.vocab, self.m.sharp)
        if self.m.noise:
            rng = np.random.default_rng(len(self.ctx) * 7919 + self.m.noise_seed)
            row = row + rng.standard_normal(row.size).astype(np.float32) * np.float32(self.m.noise)
        return row

    def frequencies(self) -> np.ndarray | None:
        if not self.m.exact:
            return None
        return np.minimum(np.exp(_row(self.m.seed, self.ctx, self.m.vocab, self.m.sharp) / 2) * 1000, 2.0**31).astype(np.int64) + 1

    def feed(self, token_id: int) -> None:
        self.ctx.append(int(token_id))

    @property
    def length(self) -> int:
        return len(self.ctx)


class FakeModel(LanguageModel):
    """Logits depend on the last 3 tokens of the context; `noise` perturbs them per call."""

    def __init__(self, vocab: int = 300, seed: int = 0, sharp: float = 3.0, noise: float = 0.0,
                 noise_seed: int = 1, exact: bool = False, fingerprint: str | None = None):
        self.vocab, self.seed, self.sharp = vocab, seed, sharp
        self.noise, self.noise_seed, self.exact = noise, noise_seed, exact
        fp = fingerprint or hashlib.sha256(f"fake{vocab}:{seed}:{sharp}:{exact}".encode()).hexdigest()
        self.info = ModelInfo(spec="fake", fingerprint=fp, vocab_size=vocab, eos_token_ids=(2,))

    def session(self, prefix_ids: Sequence[int]) -> FakeSession:
        return FakeSession(self, prefix_ids)


def own_samples(model, prompt: list[int], n: int, seed: int = 0) -> list[int]:
    """n tokens drawn from the model's own table after `prompt` (cheap to code under it)."""
    rng = np.random.default_rng(seed)
    s = model.session(prompt)
    out = []
    for _ in range(n):
        f = s.frequencies().astype(np.float64)
        t = int(rng.choice(f.size, p=f / f.sum()))
        out.append(t)
        s.feed(t)
    return out
