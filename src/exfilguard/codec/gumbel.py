"""Shared randomness: counter-based Gumbel noise and the seeded Gumbel-max sampler.

Both sides of the cap derive the same noise for a generation position from (seed, position)
alone, so the outside can predict the inside's sampling choice without any bits crossing:

    U[i]   = (top 53 bits of Philox4x64-10(key=(seed, DOMAIN), counter=(0, position, 0, 0))[i] + 1/2) / 2**53
    G[i]   = -log(-log(U[i]))                     standard Gumbel, i = 0 .. vocab-1
    token  = argmax_i (log p_T,top_p[i] + G[i])   an exact sample from p_T,top_p

The integers U come from numpy's Philox bit generator, whose raw output stream is fixed by
NEP 19 and computed in integer arithmetic: bit-identical on every platform. The position sits in
the second counter word so positions never share counter blocks (a position in the first word
would make the noise at p+1 the noise at p shifted by four entries). The transform to G is
integer arithmetic too (`gumbel_fixed`): a natural log of int64 values from a 1024-entry table
of reciprocals and their logs (computed once in `decimal`, the same everywhere) plus four
series terms, carried out so that G comes out in fixed point with 48 fractional bits, within
2**-36 of the true -log(-log(U)); U close to 1 takes the series of -log(1 - v), so G keeps its
relative precision in the far tail. No libm call: the noise is the same integers on every
machine, and as float64 (`gumbel_noise`) the same floats (an int64 to float64 conversion is correctly
rounded and a product with a power of two exact, in any IEEE-754 arithmetic).

``position`` is the index of the generated token (0 for the first token after the prompt).
"""

from __future__ import annotations

import decimal
import math
import numbers
from functools import lru_cache

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


def top_bits(seed: int, position: int, vocab: int) -> np.ndarray:
    """The top 53 bits X of each Philox word (int64 [vocab]): U = (2X + 1) / 2**54."""
    bits = uniform_bits(seed, position, vocab)
    return np.right_shift(bits, np.uint64(11), out=bits).view(np.int64)  # < 2**53: the same value


def _uniform_of(x: np.ndarray) -> np.ndarray:
    """U = (x + 1/2) / 2**53 as float64: exact while x < 2**52, else within 2**-53 of itself."""
    return (x.astype(np.float64) + 0.5) * _TWO_M53


def uniform_noise(seed: int, position: int, vocab: int) -> np.ndarray:
    """Uniforms (float64 [vocab]) strictly inside (0, 1), exact functions of the integers."""
    return _uniform_of(top_bits(seed, position, vocab))


G_FRAC = 48  # gumbel_fixed's fractional bits
_LN_TABLE_BITS = 10


@lru_cache(maxsize=1)
def _ln_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Rinv, lnc, kln2): Rinv[i] = round(2**31 / c_i), c_i = 1 + i / 1024; lnc[i] = ln(2**31 / Rinv[i])
    and kln2[k] = k ln 2 (k < 128), both at G_FRAC bits, each rounded once. Computed in decimal:
    identical on every platform."""
    ctx = decimal.Context(prec=50, rounding=decimal.ROUND_HALF_EVEN)
    one = decimal.Decimal(1 << G_FRAC)
    n = 1 << _LN_TABLE_BITS
    rinv, lnc = [], []
    for i in range(n):
        r = int(ctx.divide(decimal.Decimal(1 << 31) * n, decimal.Decimal(n + i)).to_integral_value(decimal.ROUND_HALF_EVEN))
        rinv.append(r)
        lnc.append(int(ctx.multiply(ctx.ln(ctx.divide(decimal.Decimal(1 << 31), decimal.Decimal(r))), one).to_integral_value(decimal.ROUND_HALF_EVEN)))
    ln2 = ctx.ln(decimal.Decimal(2))
    kln2 = [int(ctx.multiply(ctx.multiply(ln2, decimal.Decimal(k)), one).to_integral_value(decimal.ROUND_HALF_EVEN)) for k in range(128)]
    return np.array(rinv, dtype=np.int64), np.array(lnc, dtype=np.int64), np.array(kln2, dtype=np.int64)


_POW2 = np.array([1 << k for k in range(63)], dtype=np.int64)


def _bitlen(n: np.ndarray) -> np.ndarray:
    """Bit length of int64 values in [1, 2**62], exactly (a float's exponent field, corrected in integers)."""
    b = (n.astype(np.float64).view(np.int64) >> 52) - 1022  # may be one too high after rounding up
    return np.where(_POW2[b - 1] > n, b - 1, b)


def ln_fixed(n: np.ndarray) -> np.ndarray:
    """ln(n) at G_FRAC fractional bits for int64 n in [1, 2**62), within 2**-45; integer arithmetic."""
    rinv_t, lnc_t, kln2 = _ln_tables()
    n = np.asarray(n, dtype=np.int64)
    b = _bitlen(n)
    m = n * _POW2[62 - b]  # the mantissa: [2**61, 2**62)
    i = (m >> (61 - _LN_TABLE_BITS)) - (1 << _LN_TABLE_BITS)
    rinv = rinv_t[i]  # (2**30, 2**31]
    # r = (m / 2**61) * (rinv / 2**31), within [1 - 2**-30, 1 + 2**-10); t = r - 1 at 2**-61,
    # from m = mh * 2**31 + ml so that no product exceeds 2**62.
    mh, ml = m >> 31, m & ((1 << 31) - 1)
    t61 = (mh * rinv - (1 << 61)) + ((ml * rinv) >> 31)
    t40 = t61 >> 21  # |t| < 2**-10 * 2**40 = 2**30
    t48 = t61 >> 13
    t2 = (t40 * t40) >> 32  # t**2 at 2**-48: < 2**60 before the shift
    t3 = (t2 * t40) >> 40  # < 2**28 * 2**30
    t4 = (t2 * t2) >> 48  # < 2**56
    ln_r = t48 - t2 // 2 + t3 // 3 - t4 // 4  # ln(1 + t); the next term is below 2**-50
    return kln2[b - 1] + lnc_t[i] + ln_r


def gumbel_fixed(seed: int, position: int, vocab: int) -> np.ndarray:
    """Standard Gumbel noise -log(-log(U)) as int64 at G_FRAC fractional bits; integers only.

    U = (2X + 1) / 2**54 for the top 53 bits X of each Philox word (as uniform_noise)."""
    return gumbel_of_bits(top_bits(seed, position, vocab))


def gumbel_of_bits(x: np.ndarray) -> np.ndarray:
    """-log(-log((2x + 1) / 2**54)) at G_FRAC bits for int64 x in [0, 2**53), within 2**-36."""
    _, _, kln2 = _ln_tables()
    big = np.int64(1) << 53
    nn = 2 * x + 1  # U * 2**54, odd, < 2**54
    # U < 1 - 2**-10: -log U = 54 ln2 - ln N at 2**-48, >= 2**-10, so its relative error is
    # below 2**-36; then G = -ln(L1) = 48 ln2 - ln(L1 * 2**48).
    tail = nn >= 2 * big - (1 << 44)
    l1 = kln2[54] - ln_fixed(np.where(tail, 1, nn))
    out = kln2[G_FRAC] - ln_fixed(np.maximum(l1, 1))
    if tail.any():  # about one entry in 2**10
        # U > 1 - 2**-10: v = V / 2**54 with V = 2**54 - N < 2**44, and -log(1 - v) = v * S,
        # S = 1 + v/2 + v**2/3 + v**3/4 (next term < 2**-42), so G = 114 ln2 - ln V - ln(S * 2**60).
        vv = 2 * big - nn[tail]
        v60 = vv << 6
        v40 = vv >> 14
        v2 = (v40 * v40) >> 20  # v**2 at 2**-60 (< 2**60 before the shift)
        v3 = (((v40 * v40) >> 40) * v40) >> 20
        s60 = (np.int64(1) << 60) + v60 // 2 + v2 // 3 + v3 // 4
        out[tail] = kln2[114] - ln_fixed(vv) - ln_fixed(s60)
    return out


def gumbel_noise(seed: int, position: int, vocab: int) -> np.ndarray:
    """Standard Gumbel noise (float64 [vocab]) for one generation position; counter-based.

    gumbel_fixed as float64: the same floats on every machine."""
    return gumbel_fixed(seed, position, vocab).astype(np.float64) * 2.0**-G_FRAC


# --- The same decisions, fast --------------------------------------------------------------
# gumbel_fixed costs ~10 ms for 49,152 entries (two fixed-point logs of ~25 numpy passes each);
# the sampler and the coupled codec pay it per token on both sides of the cap. Their decisions
# (an argmax, and which 1/GRID cell a score falls in) need G exactly only where an error of a
# few 2**-30 could change them: libm's -log(-log(U)) is within a few ulp of the true value
# and gumbel_fixed within 2**-36 of it, so they differ by far less than APPROX_BOUND. The
# float approximation stands everywhere else and the integers are computed for the few entries
# near the top or near a grid line (usually none or one). The results are the exact path's, bit
# for bit, on any machine whose log is that accurate; `_approx_ok` checks this one's at first
# use (both tails included) and falls back to the integers everywhere if it is not.
APPROX_BOUND = 2.0**-30


_TAIL_X = (1 << 53) - (1 << 43)  # U >= 1 - 2**-10 from here (gumbel_of_bits' series branch)


def _approx_of_bits(x: np.ndarray) -> np.ndarray:
    """-log(-log U) in float64, U = (2x + 1) / 2**54. U as a float is within 2**-53 of itself
    (exact below 1/2), so -log U is within ~2**-53 absolutely: below U = 1 - 2**-10 that is
    2**-43 relative and G is within ~2**-43. Above it (one entry in 1,024) -log U comes from
    1 - U = (2**54 - 2x - 1) / 2**54, an exact float, through log1p."""
    lg = -np.log(_uniform_of(x))
    tail = np.flatnonzero(x >= _TAIL_X)
    if tail.size:
        lg[tail] = -np.log1p(((1 << 54) - 2 * x[tail] - 1).astype(np.float64) * -(2.0**-54))
    return -np.log(lg)


@lru_cache(maxsize=1)
def _approx_ok() -> bool:
    """Whether this machine's np.log keeps _approx_of_bits within APPROX_BOUND / 16 of gumbel_of_bits,
    on 2**16 counter-based values and both tails (U near 0 and U within 2**-44 of 1)."""
    x = top_bits(0x5EED, 0, 1 << 16)
    top = (1 << 53) - 1
    edges = np.array([0, 1, 2, 3, 1 << 20, 1 << 52, top, top - 1, top - 2, top - (1 << 10), top - (1 << 20), top - (1 << 43)], dtype=np.int64)
    x = np.concatenate((x, edges, top - x[:4096] % (1 << 44)))
    err = np.abs(_approx_of_bits(x) - gumbel_of_bits(x).astype(np.float64) * 2.0**-G_FRAC)
    return bool(np.isfinite(err).all() and err.max() <= APPROX_BOUND / 16)


def position_noise(seed: int, position: int, vocab: int) -> "PositionNoise":
    """PositionNoise, kept for the last 64 positions: the inside's sampler draws a position's noise
    and its coupled encoder needs the same noise a moment later (~1 ms each; ~0.8 MB an entry)."""
    return _position_noise(validate_seed(seed), _validate_position(position), int(vocab))


@lru_cache(maxsize=64)
def _position_noise(seed: int, position: int, vocab: int) -> "PositionNoise":
    return PositionNoise(seed, position, vocab)


class PositionNoise:
    """The noise of one position: float approximations of every entry (within APPROX_BOUND of
    gumbel_noise), and the exact values of any entries on demand."""

    def __init__(self, seed: int, position: int, vocab: int):
        self._x = top_bits(seed, position, vocab)
        self.fast = _approx_ok()
        self.approx = _approx_of_bits(self._x) if self.fast else self.exact()
        self._x.flags.writeable = False  # shared between threads (position_noise): read-only
        self.approx.flags.writeable = False
        self._reach = float(np.abs(self.approx).max())  # the largest |G| (for perturb's bound)

    def exact(self, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        """gumbel_noise's values (float64) at idx."""
        return gumbel_of_bits(self._x[idx]).astype(np.float64) * 2.0**-G_FRAC

    def perturb(self, base: np.ndarray, scale: float = 1.0, grid: int = 0) -> np.ndarray:
        """base + scale * G (float64) with the exact path's decisions: its argmax and, when grid
        > 0 (a power of two), floor(value * grid) of every entry are those of base + scale *
        gumbel_noise(...), bit for bit. The entries that could be the maximum, or sit within the
        approximation's reach of a grid line, are computed from the integers (as the exact path
        does); the others are within scale * APPROX_BOUND of it (plus float rounding)."""
        base = np.asarray(base, dtype=np.float64)
        scale = float(scale)
        out = base + scale * self.approx
        if not self.fast:
            return out
        hi, lo = float(out.max()), float(out.min())
        finite = None
        if not (math.isfinite(hi) and math.isfinite(lo)):  # -inf outside a top-p nucleus
            finite = np.isfinite(out)
            if not finite.any():
                return out
            hi, lo = float(out[finite].max()), float(out[finite].min())
        # |out - exact| <= scale * |approx - G| + rounding of the product and the sum (each half
        # an ulp of its result): m bounds it; a decision changes only within 2m of its threshold.
        big = max(abs(hi), abs(lo)) + abs(scale) * self._reach
        m = abs(scale) * APPROX_BOUND + big * 2.0**-50
        near = out >= hi - 2 * m
        if grid:
            g = out * grid
            g -= np.round(g)
            on_line = np.abs(g, out=g) <= 2 * m * grid
            near |= on_line if finite is None else finite & on_line
        idx = np.flatnonzero(near)
        out[idx] = base[idx] + scale * self.exact(idx)
        return out


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
    return int(np.argmax(position_noise(seed, position, row.size).perturb(logp)))
