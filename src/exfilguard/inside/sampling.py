"""Seeded sampling: Gumbel-max with noise that depends only on (seed, position).

argmax(log softmax(logits / T) restricted to the top-p set + G(seed, position)) is an exact
sample from the tempered, top-p-truncated distribution. Because the noise is a pure function of
(seed, position), a request's text does not depend on what else was in the batch, except where
float drift between batch shapes flips a near-tie (rare; documented in the README).
"""

from __future__ import annotations

import numpy as np

_SEED_MASK = (1 << 64) - 1


def gumbel_noise(seed: int, position: int, vocab: int) -> np.ndarray:
    """Standard Gumbel noise (float64 [vocab]) for one sampling position; counter-based."""
    rng = np.random.Generator(np.random.Philox(key=seed & _SEED_MASK, counter=[position, 0, 0, 0]))
    u = rng.random(vocab)
    return -np.log(-np.log(np.clip(u, 1e-300, None)))


def sample_token(logits: np.ndarray, seed: int, position: int, temperature: float, top_p: float) -> int:
    """The token to emit at `position` given float32 logits [vocab]."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    logp = z - np.log(np.exp(z).sum())
    if top_p < 1.0:
        order = np.argsort(-logp, kind="stable")
        cum = np.cumsum(np.exp(logp[order]))
        keep = int(np.searchsorted(cum, top_p, side="left")) + 1
        mask = np.full_like(logp, -np.inf)
        mask[order[:keep]] = 0.0
        logp = logp + mask
    return int(np.argmax(logp + gumbel_noise(seed, position, logp.shape[0])))
