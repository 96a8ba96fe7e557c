"""Deterministic logits -> integer frequencies, robust to small float noise.

Encoder and decoder compute the weak model's logits on different threads, batch shapes or
hardware, so their floats differ by ~1e-5..1e-4. A range coder only stays in sync if the
interval it gives the coded token (left cumulative, frequency) is identical on both sides.
The quantizer is built so that interval depends on as few float comparisons as possible:

1. Each logit is snapped to an absolute integer grid, ``q = floor(logit * GRID)``; a float
   perturbation changes an entry only if it straddles a grid line (probability ~ |noise| *
   GRID per entry). ``d = max(q) - q`` is the entry's level below the top.
2. Entries with ``d <= depth(tau)`` are *active* and sorted by ``(d, token id)``; everything
   else is the *tail*, reached through one escape symbol placed last. A token's left
   cumulative is the sum over the entries sorted before it, so a flip in an entry below the
   coded token changes nothing; for a greedy token (rank 0) almost nothing can.
3. Frequencies come from an integer exp table ``E_tau[d]`` (exact, computed with
   ``decimal``), scaled by a normaliser ``Zq`` that is the integer sum rounded *up* to
   ZQ_BITS significant bits: a flip of a small entry moves the sum by far less than a
   rounding step, so ``Zq`` (and every other entry's frequency) survives it. The rounding
   slack goes to the escape symbol.
4. ``tau`` (a temperature applied only in the integer table) is chosen per chunk by the
   encoder from TAUS and sent in 3 bits; greedy output codes far below the untempered cost.

Total is always exactly 2**PRECISION and constriction receives float32 copies of integers
whose sum is exactly ``2**PRECISION - n``, which makes its own quantization the identity
(`scale == 1.0`, see docs/format.md), so what is coded is exactly this module's table.
"""

from __future__ import annotations

import decimal
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

PRECISION = 24  # constriction's default categorical precision: frequencies out of 2**24
TOTAL = 1 << PRECISION
GRID = 2  # logit grid lines per logit unit (step 0.5)
DEPTH_NATS = 14.0  # active set: within this many nats of the top at tau = 1
KMAX = 4096  # at most this many active entries (more go to the tail)
ZQ_BITS = 8  # significant bits kept when rounding the normaliser up
TABLE_ONE = 1 << 30  # E_tau[0]
# Index (0..7) -> temperature of the integer table; sent per chunk in 3 bits.
TAUS: tuple[float, ...] = (1.0, 0.85, 0.7, 0.55, 0.4, 0.25, 0.15, 0.08)
# Reserve: +1 per active entry and >= 1 for the escape, whatever K is.
_SCALE = TOTAL - KMAX - 1
_LOGIT_CLAMP = 1e4


@lru_cache(maxsize=None)
def exp_table(tau_index: int) -> np.ndarray:
    """E_tau[d] = round(2**30 * exp(-d / (GRID * tau))) for every active level d (int64).

    Computed in decimal arithmetic so it is the same on every platform and libm."""
    tau = decimal.Decimal(str(TAUS[tau_index]))
    ctx = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)
    depth = depth_levels(tau_index)
    vals = []
    for d in range(depth + 1):
        x = ctx.exp(ctx.divide(decimal.Decimal(-d), decimal.Decimal(GRID) * tau))
        vals.append(int(ctx.multiply(x, decimal.Decimal(TABLE_ONE)).to_integral_value(decimal.ROUND_HALF_EVEN)))
    return np.array(vals, dtype=np.int64)


@lru_cache(maxsize=None)
def depth_levels(tau_index: int) -> int:
    """Deepest active level at this tau: DEPTH_NATS of log-probability below the top."""
    # Exact rational arithmetic: TAUS are short decimals, DEPTH_NATS and GRID integers.
    tau = decimal.Decimal(str(TAUS[tau_index]))
    return int((decimal.Decimal(str(DEPTH_NATS)) * GRID * tau).to_integral_value(decimal.ROUND_FLOOR))


def _round_up_bits(z: int, bits: int = ZQ_BITS) -> int:
    """z rounded up to `bits` significant bits (strictly above z when bits are dropped)."""
    e = z.bit_length()
    if e <= bits:
        return z
    shift = e - bits
    return ((z >> shift) + 1) << shift


@dataclass(frozen=True)
class Levels:
    """One row's quantized logits: the candidate active set sorted by (level, id)."""

    ids: np.ndarray  # int64 token ids, sorted by (d, id); d <= depth at tau index 0
    d: np.ndarray  # int64 levels below the top, non-decreasing
    vocab_size: int


def levels(logits: np.ndarray) -> Levels:
    """Snap one row of logits to the grid and sort the candidates (robust step 1 and 2)."""
    row = np.asarray(logits, dtype=np.float32)
    if row.ndim != 1 or row.size < 2:
        raise ValueError("logits must be a 1-D array with at least 2 entries")
    top_f = row.max()
    if not np.isfinite(top_f):
        if np.isnan(row).any() or top_f > 0:
            raise ValueError("logits contain NaN or +inf")
        raise ValueError("every logit is -inf")
    g = np.float32(GRID)
    # GRID is a power of two, so x * GRID is exact and floor() is the only rounding; the
    # threshold test q >= top - depth is done on the exact float product (same result).
    top = int(np.floor(np.float32(min(float(top_f), _LOGIT_CLAMP)) * g))
    scaled = row * g
    ids = np.flatnonzero(scaled >= np.float32(top - depth_levels(0)))
    q = np.floor(np.minimum(scaled[ids], np.float32(top))).astype(np.int64)
    d = (top - q).astype(np.int16)
    order = np.argsort(d, kind="stable")  # radix sort; flatnonzero is ascending, so ties stay in id order
    return Levels(ids=ids[order][:KMAX].astype(np.int64), d=d[order][:KMAX].astype(np.int64), vocab_size=row.size)


@dataclass(frozen=True)
class QuantizedDist:
    """An exact integer next-token distribution in coding order, out of 2**PRECISION.

    Position i < len(order) codes token order[i] with frequency weights[i] + 1; the last
    position is the escape (frequency escape + 1), after which a tail token is coded
    uniformly among the ids not in `order`."""

    order: np.ndarray  # int64 token ids
    weights: np.ndarray  # int64, frequency - 1 per position
    escape: int  # frequency - 1 of the escape symbol
    vocab_size: int

    def probs32(self) -> np.ndarray:
        """float32 table for constriction; its sum is exactly TOTAL - len(table)."""
        out = np.empty(self.order.size + 1, dtype=np.float32)
        out[:-1] = self.weights
        out[-1] = self.escape
        return out

    def position(self, token: int) -> int:
        """Coding position of `token`, or -1 when it is in the tail (coded after the escape)."""
        hit = np.flatnonzero(self.order == token)
        return int(hit[0]) if hit.size else -1

    @property
    def tail_size(self) -> int:
        return self.vocab_size - self.order.size

    def tail_index(self, token: int) -> int:
        """Index of a tail token among the ids not in `order`, in id order."""
        return int(token - np.count_nonzero(self.order < token))

    def tail_token(self, index: int) -> int:
        """Inverse of tail_index."""
        tok = int(index)
        for a in np.sort(self.order):
            if a <= tok:
                tok += 1
            else:
                break
        return tok

    def probability(self, token: int) -> float:
        """Exact coding probability of `token` (tail tokens: escape share, uniform)."""
        pos = self.position(token)
        if pos >= 0:
            return (int(self.weights[pos]) + 1) / TOTAL
        return (self.escape + 1) / TOTAL / max(self.tail_size, 1)

    def cost_bits(self, token: int) -> float:
        """-log2 of the coding probability (the uniform tail model is ~log2(tail) bits)."""
        return -math.log2(self.probability(token))


def from_levels(lv: Levels, tau_index: int = 0) -> QuantizedDist:
    """Integer frequencies at table temperature TAUS[tau_index] (robust step 3)."""
    table = exp_table(tau_index)
    k = int(np.searchsorted(lv.d, depth_levels(tau_index), side="right"))
    d = lv.d[:k]
    e = table[d]
    tail = lv.vocab_size - k
    # A rough tail mass: every tail entry counted at 1/8 of the deepest active level.
    z = int(e.sum()) + tail * (int(table[-1]) >> 3)
    zq = _round_up_bits(z)
    w = (e * _SCALE) // zq
    escape = TOTAL - (k + 1) - int(w.sum())
    return QuantizedDist(order=lv.ids[:k], weights=w, escape=escape, vocab_size=lv.vocab_size)


def quantize(logits: np.ndarray, tau_index: int = 0) -> QuantizedDist:
    """The exact integer distribution the `model` codec codes with, from one row of logits."""
    return from_levels(levels(logits), tau_index)


def from_frequencies(freqs: np.ndarray) -> QuantizedDist:
    """An exact integer table from a model (n-gram) rescaled to 2**PRECISION in id order."""
    f = np.asarray(freqs, dtype=np.int64)
    if f.ndim != 1 or f.size < 2 or (f < 1).any():
        raise ValueError("frequencies must be a 1-D table with every entry >= 1")
    if int(f.max()) >= 1 << 32:
        raise ValueError("frequency table entries must fit in 32 bits")
    v = f.size
    scale = TOTAL - v - 1
    w = (f * scale) // int(f.sum())  # < 2**56: no int64 overflow
    escape = TOTAL - (v + 1) - int(w.sum())
    return QuantizedDist(order=np.arange(v, dtype=np.int64), weights=w, escape=escape, vocab_size=v)


def tau_costs(lv: Levels, token: int) -> np.ndarray:
    """Exact coding cost in bits of `token` under every table temperature (for choosing tau).

    Only the histogram of levels matters for the normaliser, so this is O(K) once plus
    O(depth) per tau."""
    hist = np.bincount(lv.d, minlength=depth_levels(0) + 1)
    hit = np.flatnonzero(lv.ids == token)
    dx = int(lv.d[hit[0]]) if hit.size else -1
    out = np.empty(len(TAUS), dtype=np.float64)
    for t in range(len(TAUS)):
        table = exp_table(t)
        depth = depth_levels(t)
        k = int(hist[: depth + 1].sum())
        tail = lv.vocab_size - k
        zq = _round_up_bits(int((hist[: depth + 1] * table).sum()) + tail * (int(table[-1]) >> 3))
        if 0 <= dx <= depth:
            freq = int(table[dx]) * _SCALE // zq + 1
            out[t] = PRECISION - math.log2(freq)
        else:
            w = (table * _SCALE) // zq
            esc = TOTAL - k - int((hist[: depth + 1] * w).sum())
            out[t] = PRECISION - math.log2(esc) + math.log2(max(tail, 2))
    return out


def chunk_tau_costs(rows: list[Levels], tokens: list[int]) -> np.ndarray:
    """Total cost in bits of a chunk under every table temperature, vectorized over tokens.

    Only the encoder's choice of tau depends on it (the decoder is told tau), so float
    arithmetic is fine here; tau_costs is the exact per-token reference."""
    n = len(rows)
    if n == 0:
        return np.zeros(len(TAUS))
    width = depth_levels(0) + 1
    hist = np.zeros((n, width), dtype=np.int64)
    dx = np.full(n, -1, dtype=np.int64)
    vocab = np.empty(n, dtype=np.float64)
    for i, (lv, tok) in enumerate(zip(rows, tokens)):
        hist[i] = np.bincount(lv.d, minlength=width)
        hit = np.flatnonzero(lv.ids == tok)
        if hit.size:
            dx[i] = lv.d[hit[0]]
        vocab[i] = lv.vocab_size
    out = np.empty(len(TAUS))
    for t in range(len(TAUS)):
        table = exp_table(t)
        depth = depth_levels(t)
        h = hist[:, : depth + 1]
        k = h.sum(axis=1)
        tail = vocab - k
        z = (h @ table).astype(np.float64) + tail * float(int(table[-1]) >> 3)
        shift = np.maximum(np.floor(np.log2(z)) + 1 - ZQ_BITS, 0)
        zq = (np.floor(z / 2**shift) + (shift > 0)) * 2**shift
        inside = (dx >= 0) & (dx <= depth)
        ex = table[np.clip(dx, 0, depth)].astype(np.float64)
        freq = np.floor(ex * _SCALE / zq) + 1
        esc = TOTAL - k - (h @ table).astype(np.float64) * _SCALE / zq
        cost = np.where(inside, PRECISION - np.log2(freq), PRECISION - np.log2(np.maximum(esc, 1)) + np.log2(np.maximum(tail, 2)))
        out[t] = cost.sum()
    return out
