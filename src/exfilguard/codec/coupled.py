"""The `coupled` codec: shared Gumbel noise, so only the strong/weak disagreement is coded.

The inside samples token x_t = argmax(log p_T(x) + G_t(x)) with G_t = gumbel_noise(seed, t)
(exfilguard.codec.gumbel). The outside knows the seed, so it can form the weak model's
perturbed scores

    s_t(x) = logits_weak(x) / T + G_t(x)        (T = 0: s_t = logits_weak, no noise)

whose argmax is the weak model's guess of x_t. Each token is range-coded under a distribution
the outside computes from s_t alone, concentrated near the top of s_t:

  stage 1  r(x) ~ exp(-d(x) / (GRID * tau)) over the active set, where d(x) = top - floor(GRID * s(x))
           is x's level below the best perturbed score on an absolute grid (step 1/GRID), plus an
           escape symbol. tau is chosen per chunk by the encoder (3-bit record param), which
           calibrates the sharpness to the model pair and temperature; tau -> 0 is greedy.
  stage 2  after an escape: the token under the quantizer's softmax(s) table (codec.quantizer).

When the weak model agrees with the strong one (same argmax) the token costs -log2 r(top),
a fraction of a bit. Why it is safe across machines: d and the active order depend only on
which grid cell each score falls in, so weak-model float noise (~1e-4) changes the coded
interval only when a score near the top straddles a grid line; the chunk checks catch that
rare case and a raw resend resynchronises (the codec's chunks depend only on true history).

The output stays a deterministic function of (prompt, seed, strong weights): the codec only
describes tokens the sampler chose; nothing here feeds back into sampling.
"""

from __future__ import annotations

import decimal
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np

from exfilguard.codec import quantizer as Q
from exfilguard.codec.codecs import COUPLED_CODEC_ID, Codec, CodecState, CodecStats, register_codec
from exfilguard.codec.gumbel import gumbel_noise, validate_seed
from exfilguard.codec.rangecoding import StepDecoder, encode_steps
from exfilguard.errors import ConfigError, FrameCorrupt, RequestInvalid

GRID = 16  # grid lines per unit of perturbed score
DEPTH_NATS = 16.0  # active set: levels within this many units of tau below the top
KMAX = 2048  # at most this many active entries
TABLE_ONE = 1 << 30
ZQ_BITS = 8
PRECISION = Q.PRECISION
TOTAL = Q.TOTAL
_SCALE = TOTAL - KMAX - 2  # room for +1 per active entry and an escape >= 1
BONUS = 1  # extra weight of the argmax of the perturbed scores (the predicted token)
ESCAPE_MIN = TOTAL >> 11  # the escape never costs more than 11 bits
# Record param (3 bits) -> stage-1 temperature, in units of the perturbed score; param
# PLAIN (7) codes the chunk under the weak model's tempered distribution without the noise,
# which is cheaper when the weak model is far from the strong one (agreement is rare and the
# noise only blurs q).
TAUS: tuple[float, ...] = (0.03, 0.06, 0.1, 0.16, 0.25, 0.4, 0.7)
PLAIN = len(TAUS)


@lru_cache(maxsize=None)
def depth_levels(tau_index: int) -> int:
    """Deepest active level at this tau (exact decimal arithmetic)."""
    tau = decimal.Decimal(str(TAUS[tau_index]))
    return int((decimal.Decimal(str(DEPTH_NATS)) * GRID * tau).to_integral_value(decimal.ROUND_FLOOR))


@lru_cache(maxsize=None)
def exp_table(tau_index: int) -> np.ndarray:
    """E[d] = round(2**30 * exp(-d / (GRID * tau))) for d = 0 .. depth (int64), platform-free."""
    tau = decimal.Decimal(str(TAUS[tau_index]))
    ctx = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)
    vals = []
    for d in range(depth_levels(tau_index) + 1):
        x = ctx.exp(ctx.divide(decimal.Decimal(-d), decimal.Decimal(GRID) * tau))
        vals.append(int(ctx.multiply(x, decimal.Decimal(TABLE_ONE)).to_integral_value(decimal.ROUND_HALF_EVEN)))
    return np.array(vals, dtype=np.int64)


def perturbed_scores(logits: np.ndarray, temperature: float, seed: int, position: int) -> np.ndarray:
    """s = logits / T + G(seed, position) in float64 (T <= 0: the logits, no noise)."""
    row = np.asarray(logits, dtype=np.float32)
    if row.ndim != 1 or row.size < 2:
        raise ValueError("logits must be a 1-D array with at least 2 entries")
    if not np.isfinite(row).all():
        raise ValueError("logits must be finite")
    if temperature <= 0.0:
        return row.astype(np.float64)
    return row.astype(np.float64) / float(temperature) + gumbel_noise(seed, position, row.size)


@dataclass(frozen=True)
class Position:
    """One position's perturbed scores reduced to what coding needs (exactly reproducible)."""

    ids: np.ndarray  # int64: the argmax, then the other candidates by (d, id); d <= widest depth
    d: np.ndarray  # int64 levels below the top, non-decreasing
    scores: np.ndarray  # float64 [vocab] perturbed scores, for the stage-2 table
    plain: np.ndarray  # float32 [vocab] weak logits / T without noise, for the PLAIN mode
    freqs: np.ndarray | None = None  # the weak model's exact integer table (n-gram), if any

    def plain_dist(self) -> Q.QuantizedDist:
        """PLAIN mode's table: the model codec's exact one where the model has it."""
        return Q.from_frequencies(self.freqs) if self.freqs is not None else Q.quantize(self.plain, 0)

    @property
    def vocab_size(self) -> int:
        return int(self.scores.size)


def position_levels(scores: np.ndarray, plain: np.ndarray | None = None, freqs: np.ndarray | None = None) -> Position:
    """Snap perturbed scores to the grid; keep the candidates of the widest table."""
    s = np.asarray(scores, dtype=np.float64)
    # GRID is a power of two: the product is exact and floor() is the only rounding.
    q = np.floor(np.clip(s, -1e6, 1e6) * GRID).astype(np.int64)
    top = int(q.max())
    ids = np.flatnonzero(q >= top - depth_levels(len(TAUS) - 1))
    d = top - q[ids]
    order = np.argsort(d, kind="stable")  # ties stay in id order
    ids, d = ids[order][:KMAX], d[order][:KMAX]
    # The argmax goes first and gets the BONUS weight: it is the weak model's guess, and a grid
    # cell shared with it must not halve the price of agreement. It differs between two
    # machines only when the two best scores are within float noise of each other.
    best = int(np.argmax(s))
    at = int(np.flatnonzero(ids == best)[0])
    if at:
        ids = np.concatenate(([best], np.delete(ids, at)))
        d = np.concatenate(([d[at]], np.delete(d, at)))
    return Position(ids=ids, d=d, scores=s, plain=np.asarray(s if plain is None else plain, dtype=np.float32), freqs=freqs)


def _round_up_bits(z: int, bits: int = ZQ_BITS) -> int:
    e = z.bit_length()
    if e <= bits:
        return z
    shift = e - bits
    return ((z >> shift) + 1) << shift


def _stage1_weights(pos: Position, tau_index: int) -> tuple[int, np.ndarray, int]:
    """(active count k, frequency - 1 per active entry, escape frequency - 1)."""
    table = exp_table(tau_index)
    k = int(np.searchsorted(pos.d, depth_levels(tau_index), side="right"))
    e = table[pos.d[:k]]
    e[0] *= BONUS
    # Normaliser rounded up to ZQ_BITS significant bits: a flip in a small entry moves the sum
    # by less than a rounding step, so the other entries keep their frequencies.
    zq = _round_up_bits(int(e.sum()))
    w = (e * (_SCALE - ESCAPE_MIN)) // zq
    escape = TOTAL - (k + 1) - int(w.sum())
    return k, w, escape


def stage1_dist(pos: Position, tau_index: int) -> Q.QuantizedDist:
    """Stage 1 as a QuantizedDist over *positions* 0..k-1 plus the escape (coded as k)."""
    k, w, escape = _stage1_weights(pos, tau_index)
    return Q.QuantizedDist(order=np.arange(k, dtype=np.int64), weights=w, escape=escape, vocab_size=k + 1)


def stage2_dist(pos: Position) -> Q.QuantizedDist:
    """The escape's table: the quantizer's robust softmax of the perturbed scores."""
    return Q.quantize(pos.scores.astype(np.float32), 0)


def token_cost_bits(pos: Position, token: int) -> np.ndarray:
    """Exact coding cost of `token` at every tau index (bits), for choosing tau per chunk."""
    hit = np.flatnonzero(pos.ids == token)
    idx = int(hit[0]) if hit.size else -1
    out = np.empty(len(TAUS) + 1)
    out[PLAIN] = pos.plain_dist().cost_bits(token)
    esc2: float | None = None
    for t in range(len(TAUS)):
        k, w, escape = _stage1_weights(pos, t)
        if 0 <= idx < k:
            out[t] = PRECISION - math.log2(int(w[idx]) + 1)
        else:
            if esc2 is None:
                esc2 = stage2_dist(pos).cost_bits(token)
            out[t] = PRECISION - math.log2(escape + 1) + esc2
    return out


def coding_steps(pos: Position, tau_index: int, token: int) -> list[tuple[Q.QuantizedDist, int]]:
    """The range-coder steps for one token: its stage-1 slot, or the escape then stage 2."""
    if tau_index == PLAIN:
        return [(pos.plain_dist(), int(token))]
    hit = np.flatnonzero(pos.ids == token)
    k, _, _ = _stage1_weights(pos, tau_index)
    s1 = stage1_dist(pos, tau_index)
    if hit.size and int(hit[0]) < k:
        return [(s1, int(hit[0]))]
    return [(s1, k), (stage2_dist(pos), int(token))]


class _CoupledState(CodecState):
    """Per-stream state: the weak model's session over prompt + true history, and positions."""

    def __init__(self, codec: "CoupledCodec", prompt_ids: Sequence[int]):
        self.codec = codec
        self.model = codec.model
        self.prompt = [int(t) for t in prompt_ids]
        if not self.prompt:
            raise ValueError("the coupled codec needs a non-empty prompt (at least BOS)")
        self.history: list[int] = []
        self._session: Any = None
        self._pending: list[int] = []  # tokens to feed before the next logits
        self._rows: list[Position] = []  # encoder: one per pushed, not yet coded token

    def _position(self, index: int) -> Position:
        """Perturbed-score levels before generated token number `index`."""
        c = self.codec
        t0 = time.perf_counter()
        if self._session is None:
            self._session = self.model.session(self.prompt + self.history)
            self._pending = []
        for tok in self._pending:
            self._session.feed(tok)
        self._pending = []
        logits = self._session.logits()
        t1 = time.perf_counter()
        t = c.temperature / c.weak_temperature_ratio if c.temperature > 0 else 0.0
        s = perturbed_scores(logits, t, c.seed, index)
        plain = np.asarray(logits, dtype=np.float32) if t <= 0 else (np.asarray(logits, dtype=np.float32) / np.float32(t))
        freqs = self._session.frequencies()
        pos = position_levels(s, plain, None if freqs is None else np.asarray(freqs))
        c.stats.model_s += t1 - t0
        c.stats.codec_s += time.perf_counter() - t1
        return pos

    # -- encoder
    def observe(self, token: int) -> None:
        self._rows.append(self._position(len(self.history) + len(self._rows)))
        self._pending.append(int(token))

    def encode_chunk(self, tokens: Sequence[int]) -> tuple[int, bytes]:
        tokens = [int(t) for t in tokens]
        for tok in tokens:
            if not 0 <= tok < self.model.vocab_size:
                raise ValueError(f"token id {tok} is outside the weak model's vocabulary")
        if len(self._rows) != len(tokens):  # tokens pushed without observe()
            self._rows = []
            for tok in tokens:
                self.observe(tok)
        rows, self._rows = self._rows, []
        t0 = time.perf_counter()
        tau = self.codec.tau
        if tau is None:
            costs = np.zeros(len(TAUS) + 1)
            for pos, tok in zip(rows, tokens):
                costs += token_cost_bits(pos, tok)
            tau = int(np.argmin(costs))
        steps: list[tuple[Q.QuantizedDist, int]] = []
        for pos, tok in zip(rows, tokens):
            steps += coding_steps(pos, tau, tok)
            self.codec.stats.agreements += int(pos.ids[0] == tok)
        payload = encode_steps(steps)
        self.codec.stats.codec_s += time.perf_counter() - t0
        self.codec.stats.tokens += len(tokens)
        self.history += tokens
        return tau, payload

    # -- decoder
    def decode_chunk(self, param: int, payload: bytes, count: int) -> list[int] | None:
        if not 0 <= param <= PLAIN:
            raise FrameCorrupt(f"coupled chunk with tau index {param}")
        dec = StepDecoder(payload)
        out: list[int] = []
        for i in range(count):
            pos = self._position(len(self.history) + i)
            t0 = time.perf_counter()
            if param == PLAIN:
                tok = dec.decode(pos.plain_dist())
            else:
                s1 = stage1_dist(pos, param)
                slot = dec.decode(s1)
                tok = int(pos.ids[slot]) if slot < s1.order.size else dec.decode(stage2_dist(pos))
            self.codec.stats.codec_s += time.perf_counter() - t0
            out.append(tok)
            self._pending.append(tok)
        return out

    def commit(self, tokens: Sequence[int], resent: bool = False) -> None:
        self.history += [int(t) for t in tokens]
        if resent:
            # The session read the wrong tokens: rebuild it from the true history.
            self._session = None
            self._pending = []


@dataclass
class CoupledStats(CodecStats):
    agreements: int = 0  # encoder: tokens equal to the weak model's perturbed argmax


@dataclass
class CoupledCodec(Codec):
    """Range coding of the strong model's seeded samples given the shared Gumbel noise.

    Unbound (seed None) it is a template: `for_request(seed, temperature, top_p)` gives the
    per-request codec that streams are made with. tau: force a stage-1 table (None: the
    encoder picks the cheapest per chunk). weak_temperature_ratio: the weak scores use
    temperature T / ratio (1.0: the strong model's T)."""

    model: Any
    seed: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    tau: int | None = None
    weak_temperature_ratio: float = 1.0
    stats: CoupledStats = field(default_factory=CoupledStats)

    name: ClassVar[str] = "coupled"
    codec_id: ClassVar[int] = COUPLED_CODEC_ID
    uses_model: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.seed is not None:
            self.seed = validate_seed(self.seed)
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise RequestInvalid(f"temperature must be a finite number >= 0, got {self.temperature!r}", param="temperature")
        if self.tau is not None and not 0 <= self.tau <= PLAIN:
            raise ValueError(f"tau index must be in 0..{PLAIN}")

    @property
    def fingerprint(self) -> str:
        return str(self.model.fingerprint)

    def for_request(self, seed: object, temperature: float, top_p: float = 1.0) -> "CoupledCodec":
        """The codec for one request; RequestInvalid if the seed is missing or malformed.
        Shares the template's stats."""
        return replace(self, seed=validate_seed(seed), temperature=float(temperature), top_p=float(top_p), stats=self.stats)

    def new_state(self, prompt_ids: Sequence[int]) -> CodecState:
        if self.seed is None:
            raise RequestInvalid(
                "the coupled codec needs the request's sampling seed: bind it with for_request(seed, temperature)",
                param="seed",
            )
        return _CoupledState(self, prompt_ids)


def _coupled_codec(weak_model: Any = None, **options: Any) -> CoupledCodec:
    if weak_model is None:
        raise ConfigError("the `coupled` codec needs a weak model (e.g. --weak smollm2)")
    return CoupledCodec(weak_model, **options)


register_codec("coupled", COUPLED_CODEC_ID, _coupled_codec, True)
