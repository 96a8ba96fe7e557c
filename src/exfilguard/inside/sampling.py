"""Seeded sampling: the coupled codec's Gumbel-max sampler (exfilguard.codec.gumbel).

argmax(log p_T,top_p + G(seed, position)) is an exact sample from the tempered, top-p
distribution, and the noise is a pure function of (seed, position): a request's text does not
depend on what else was in the batch, except where float drift between batch shapes flips a
near-tie (rare; see the README), and the outside can derive the same noise (coupled codec).
"""

from __future__ import annotations

import numpy as np

from exfilguard.codec import gumbel


def sample_token(logits: np.ndarray, seed: int, position: int, temperature: float, top_p: float) -> int:
    """The token to emit at `position` (0 = first generated token) given float32 logits."""
    if temperature <= 0.0 or top_p <= 0.0:
        return int(np.argmax(logits))
    return gumbel.sample_token(logits, temperature, top_p, seed % (1 << 64), position)
