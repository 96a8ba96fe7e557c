"""Shared randomness: counter-based Gumbel noise and the seeded Gumbel-max sampler.

Both sides of the cap derive the same noise for a generation position from (seed, position)
alone, so the outside can predict the inside's sampling choice without any bits crossing:

    U[i]   = (top 53 bits of Philox4x64-10(key=(seed, DOMAIN), counter=(0, position, 0, 0))[i] + 1/2) / 2**53
    G[i]   = -log(-log(U[i]))                     standard Gumbel, i = 0 .. vocab-1
    token  = argmax_i (log p_T,top_p[i] + G[i])   an exact sample from p_T,top_p

The integers U come from numpy's Philox bit generator, whose raw output stream is fixed by
NEP 19 and computed in integer arithmetic: bit-identical on every platform. The position sits in
the second counter word so positions never share counter blocks (a position in the first word
would make the noise at p+1 the noise at p shifted by four entries). The float transform uses
numpy's float64 log, deterministic on one machine but not guaranteed identical across libm /
SIMD builds: the sampler only needs it for reproducibility, and the coupled codec quantizes
the perturbed scores so that last-bit differences almost never change what it codes.

``position`` is the index of the generated token (0 for the first token after the prompt).
"""

from __future__ import annotations

import numbers

import numpy as np

from exfilguard.errors import RequestInvalid

SEED_BITS = 64
MAX_SEED = (1 << SEED_BITS) - 1
# Second key word: names this use of Philox, so other seeded streams never collide with ours.
DOMAIN = int.from_bytes(b"xfg-gum1", "big")
_TWO_M53 = 2.0**-53


def validate_seed(seed: object) -> int:
    """The seed as an int in [0, 2**64); RequestInvalid (param "seed") for anything else."""
    if seed is None:
        raise RequestInvalid("this request needs a sampling seed (an integer in [0, 2**64)) and has none", param="seed")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise RequestInvalid(f"seed must be an integer in [0, 2**64), got {type(seed).__name__} {seed!r}", param="seed")
    s = int(seed)
    if not 0 <= s <= MAX_SEED:
        raise RequestInvalid(f"seed must be an integer in [0, 2**64), got {s}", param="seed")
    return s


def _validate_position(position: object) -> int:
    if isinstance(position, bool) or not isinstance(position, numbers.Integral) or not 0 <= int(position) < 1 << 64:
        raise ValueError(f"position must be an integer in [0, 2**64), got {position!r}")
    return int(position)


def uniform_bits(seed: int, position: int, vocab: int) -> np.ndarray:
    """The raw counter-based integers (uint64 [vocab]) behind the noise at one position."""
    s = validate_seed(seed)
    p = _validate_position(position)
    if vocab < 1:
        raise ValueError("vocab must be >= 1")
    gen = np.random.Philox(key=s | (DOMAIN << 64), counter=p << 64)
    return gen.random_raw(int(vocab))


def uniform_noise(seed: int, position: int, vocab: int) -> np.ndarray:
    """Uniforms (float64 [vocab]) strictly inside (0, 1), exact functions of the integers."""
    x = uniform_bits(seed, position, vocab) >> np.uint64(11)
    return (x.astype(np.float64) + 0.5) * _TWO_M53


def gumbel_noise(seed: int, position: int, vocab: int) -> np.ndarray:
    """Standard Gumbel noise (float64 [vocab]) for one generation position; counter-based."""
    return -np.log(-np.log(uniform_noise(seed, position, vocab)))


def tempered_logprobs(logits: np.ndarray, temperature: float, top_p: float = 1.0) -> np.ndarray:
    """log softmax(logits / T) restricted to the top-p nucleus (-inf outside), float64.

    The nucleus is the smallest prefix, in order of decreasing probability (ties: lower id
    first), whose mass reaches top_p."""
    if not temperature > 0.0:
        raise ValueError("temperature must be > 0 for sampling (T = 0 is greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max()
    logp = z - np.log(np.exp(z).sum())
    if top_p < 1.0:
        order = np.argsort(-logp, kind="stable")
        cum = np.cumsum(np.exp(logp[order]))
        keep = min(int(np.searchsorted(cum, top_p, side="left")) + 1, order.size)
        out = np.full_like(logp, -np.inf)
        out[order[:keep]] = logp[order[:keep]]
        logp = out
    return logp


def sample_token(logits: np.ndarray, temperature: float, top_p: float, seed: int, position: int) -> int:
    """The token the inside emits at `position`: Gumbel-max over the tempered, top-p logits.

    An exact sample from softmax(logits / T) within the top-p nucleus, and a deterministic
    function of (logits, T, top_p, seed, position). T = 0 is greedy: argmax of the logits,
    ties to the lowest id, noise unused (the seed is still validated)."""
    seed = validate_seed(seed)
    row = np.asarray(logits)
    if row.ndim != 1 or row.size < 1:
        raise ValueError("logits must be a non-empty 1-D array")
    if temperature <= 0.0:
        return int(np.argmax(row))
    logp = tempered_logprobs(row, temperature, top_p)
    return int(np.argmax(logp + gumbel_noise(seed, position, row.size)))
