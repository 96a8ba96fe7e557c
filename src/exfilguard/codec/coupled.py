"""The `coupled` codec: shared Gumbel noise, so only the strong/weak disagreement is coded.

The inside samples token x_t = argmax(log p_T(x) + G_t(x)) with G_t = gumbel_noise(seed, t)
(exfilguard.codec.gumbel). The outside knows the seed, so it can form the weak model's
perturbed scores in logit units

    u_t(x) = logits_weak(x) + T * G_t(x)        (T = 0: u_t = logits_weak, no noise)

whose argmax is the weak model's guess of x_t. Each token is range-coded under an exact
integer table the outside computes from u_t and the weak logits alone (mode m, 3-bit record
param, chosen per chunk by the encoder):

  stage 1  r(x) ~ exp(-d(x) / (GRID * tau_m)) over the candidates, where d(x) = top - floor(GRID * u(x))
           is x's level below the best perturbed score on an absolute grid (step 1/GRID)
  plain    the weak model's own tempered table (the `model` codec's quantizer, or the exact
           integer table of an n-gram)
  mode m   lambda_m * stage 1 + (1 - lambda_m) * plain; mode PLAIN: plain alone

Agreement (same argmax) costs about -log2(lambda * r(top)), a fraction of a bit; a miss costs
about its plain price plus -log2(1 - lambda). Why it is safe across machines: d and the
candidate order depend only on which grid cell each score falls in, so weak-model float noise
(~1e-4) changes the coded interval only when a score near the top straddles a grid line; the
chunk checks catch that rare case and a raw resend resynchronises (the codec's chunks depend
only on true history).

The output stays a deterministic function of (prompt, seed, strong weights): the codec only
describes tokens the sampler chose; nothing here feeds back into sampling.
"""

from __future__ import annotations

import decimal
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from typing import Any, ClassVar

import numpy as np

from exfilguard.codec import quantizer as Q
from exfilguard.codec.codecs import COUPLED_CODEC_ID, Codec, CodecState, CodecStats, WeakModelState
from exfilguard.codec.gumbel import position_noise, validate_seed
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
ESCAPE_MIN = TOTAL >> 11  # stage-1 mass held back (from the first, escape-based design; changing it changes the coded bits)
# Record param (3 bits) -> a mode. Modes 0..6 code each token under the mixture
#     LAMBDAS[m]/256 * stage1(tau = TAUS[m]) + (1 - LAMBDAS[m]/256) * plain
# where stage 1 is the sharp table over the perturbed scores (in logit units: logits + T*G, so
# tau is the scale of the strong/weak logit disagreement, the same at every temperature) and
# plain is the weak model's own tempered table. Agreement costs about -log2(lambda); a token
# the noise does not predict still costs about its plain price plus -log2(1 - lambda). Mode
# PLAIN (7) is the plain table alone, for a weak model too far off for the noise to help. The
# encoder picks the cheapest mode per chunk: that calibrates the codec to the model pair.
TAUS: tuple[float, ...] = (0.05, 0.15, 0.3, 0.5, 0.8, 1.2, 1.8)
LAMBDAS: tuple[int, ...] = (248, 243, 230, 230, 230, 230, 218)  # out of 256
PLAIN = len(TAUS)
_MIX_SLACK = 1024  # frequency units kept for the escape beyond +1 per table entry


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


def _logit_row(logits: np.ndarray) -> np.ndarray:
    row = np.asarray(logits, dtype=np.float32)
    if row.ndim != 1 or row.size < 2:
        raise ValueError("logits must be a 1-D array with at least 2 entries")
    if not np.isfinite(row).all():
        raise ValueError("logits must be finite")
    return row.astype(np.float64)


def coupled_scores(logits: np.ndarray, temperature: float, seed: int, position: int) -> np.ndarray:
    """logits + T * G(seed, position) in float64 (T <= 0: the logits, no noise).

    T times logits / T + G, so the same argmax as the sampler's (the weak model's guess); in
    logit units, so one stage-1 tau fits every temperature (it is the scale of the strong/weak
    disagreement). The argmax and every 1/GRID cell are those of the exact noise; the other
    values are within 2**-29 * T of it (PositionNoise.perturb)."""
    row = _logit_row(logits)
    if temperature <= 0.0:
        return row
    # The grid cells and the argmax are all position_levels reads: exact, at a fraction of the cost.
    return position_noise(seed, position, row.size).perturb(row, float(temperature), GRID)


@dataclass(frozen=True)
class Position:
    """One position's perturbed scores reduced to what coding needs (exactly reproducible)."""

    ids: np.ndarray  # int64: the argmax, then the other candidates by (d, id); d <= widest depth
    d: np.ndarray  # int64 levels below the top, non-decreasing
    plain: np.ndarray  # float32 [vocab] weak logits / T without noise, for the plain table
    freqs: np.ndarray | None = None  # the weak model's exact integer table (n-gram), if any

    @cached_property
    def plain_dist(self) -> Q.QuantizedDist:
        """The plain table: the model codec's (exact for an n-gram). Built once per position:
        every mode's table mixes it in, and the encoder prices every mode."""
        return Q.from_frequencies(self.freqs) if self.freqs is not None else Q.quantize(self.plain, 0)

    @cached_property
    def plain_index(self) -> np.ndarray:
        """Token id -> its position in the plain table's order, -1 for the tail."""
        order = self.plain_dist.order
        if self.freqs is not None:  # an exact table lists every id, in id order (Q.from_frequencies)
            return order
        out = np.full(self.vocab_size, -1, dtype=np.int64)
        out[order] = np.arange(order.size)
        return out

    @property
    def vocab_size(self) -> int:
        return int(self.plain.size)


def _first_by_depth(ids: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first KMAX entries in (depth, id) order, sorted so (ids ascend on entry). Same result as
    a stable argsort of all of them, but a full sort of up to 49,152 depths cost ~5 ms a token:
    a partition finds the KMAX-th depth, and only the entries up to it are sorted."""
    if len(d) > KMAX:
        cut = np.partition(d, KMAX - 1)[KMAX - 1]
        below = d < cut
        at = np.flatnonzero(d == cut)[: KMAX - int(below.sum())]  # ties at the cut: lowest ids first
        keep = below
        keep[at] = True
        ids, d = ids[keep], d[keep]
    order = np.argsort(d, kind="stable")  # ties stay in id order
    return ids[order], d[order]


def position_levels(scores: np.ndarray, plain: np.ndarray | None = None, freqs: np.ndarray | None = None) -> Position:
    """Snap perturbed scores to the grid; keep the candidates of the widest table."""
    s = np.asarray(scores, dtype=np.float64)
    # A cell is floor(GRID * clip(s)): GRID is a power of two, so the product is exact and floor()
    # the only rounding. floor(GRID * x) >= L for an integer L exactly when x >= L / GRID (exact
    # too), so only the entries in the window are snapped.
    c = s if -1e6 <= float(s.min()) and float(s.max()) <= 1e6 else np.clip(s, -1e6, 1e6)
    top = int(np.floor(float(c.max()) * GRID))
    low = top - depth_levels(len(TAUS) - 1)
    ids = np.flatnonzero(c >= low / GRID)
    d = top - np.floor(c[ids] * GRID).astype(np.int64)
    ids, d = _first_by_depth(ids, d)
    # The argmax goes first and gets the BONUS weight: it is the weak model's guess, and a grid
    # cell shared with it must not halve the price of agreement. It differs between two
    # machines only when the two best scores are within float noise of each other.
    best = int(np.argmax(s))
    hit = np.flatnonzero(ids == best)
    if not hit.size:  # more than KMAX entries share the top cell and the argmax came after them
        ids, d = np.append(ids[:-1], best), np.append(d[:-1], 0)
        hit = np.array([ids.size - 1])
    at = int(hit[0])
    if at:
        ids = np.concatenate(([best], np.delete(ids, at)))
        d = np.concatenate(([d[at]], np.delete(d, at)))
    return Position(ids=ids, d=d, plain=np.asarray(s if plain is None else plain, dtype=np.float32), freqs=freqs)


def _round_up_bits(z: int, bits: int = ZQ_BITS) -> int:
    e = z.bit_length()
    if e <= bits:
        return z
    shift = e - bits
    return ((z >> shift) + 1) << shift


def _stage1_weights(pos: Position, tau_index: int) -> tuple[int, np.ndarray]:
    """(active count k, frequency - 1 per active entry) of the stage-1 table out of 2**24."""
    table = exp_table(tau_index)
    k = int(np.searchsorted(pos.d, depth_levels(tau_index), side="right"))
    e = table[pos.d[:k]]
    e[0] *= BONUS
    # Normaliser rounded up to ZQ_BITS significant bits: a flip in a small entry moves the sum
    # by less than a rounding step, so the other entries keep their frequencies.
    zq = _round_up_bits(int(e.sum()))
    w = (e * (_SCALE - ESCAPE_MIN)) // zq
    return k, w


def _tail_share(plain: Q.QuantizedDist) -> int:
    """What the plain table charges one token of its tail: its share of the plain escape."""
    return (plain.escape + 1) // max(plain.tail_size, 1)


def _mix_weights(f: np.ndarray | int, size: int) -> np.ndarray | int:
    """mix_dist's weights (frequency - 1) of entries whose mixed mass is f = lambda * (stage-1
    frequency) + (256 - lambda) * (plain frequency), out of 2**(PRECISION + 8), in a table of
    `size` entries: scaled to the room left after +1 per entry and the escape."""
    room = TOTAL - (size + 1) - _MIX_SLACK  # +1 per entry and the escape come on top
    return (f * room) // (TOTAL << 8)  # < 2**57: no int64 overflow


def mix_dist(pos: Position, mode: int) -> Q.QuantizedDist:
    """Mode `mode`'s exact integer table over token ids: lambda * stage 1 + (1 - lambda) * plain.

    Coding order: the stage-1 candidates (the weak guess first, then by level), then the plain
    table's other entries in its own order, then one escape to a uniform code over the rest.
    Every frequency is integer arithmetic on the two integer tables, so both sides get the same
    table whenever they got the same grid cells; the total is exactly 2**PRECISION."""
    if not 0 <= mode < PLAIN:
        raise ValueError(f"mixture mode must be in 0..{PLAIN - 1}")
    k, w1 = _stage1_weights(pos, mode)
    plain = pos.plain_dist
    vocab = pos.vocab_size
    # Plain frequency per token id; a token in the plain table's tail gets its share of the
    # plain escape (what the plain table would charge it), so listing it in stage 1 never
    # prices it above what plain alone would.
    dense = np.full(vocab, _tail_share(plain), dtype=np.int64)
    dense[plain.order] = plain.weights + 1
    ids1 = pos.ids[:k]
    a = LAMBDAS[mode]
    b = 256 - a
    in1 = np.zeros(vocab, dtype=bool)
    in1[ids1] = True
    rest = ~in1[plain.order]
    order = np.concatenate((ids1, plain.order[rest]))
    f = np.concatenate((a * (w1 + 1) + b * dense[ids1], b * (plain.weights[rest] + 1)))  # < 2**33
    w = _mix_weights(f, order.size)
    escape = TOTAL - (order.size + 1) - int(w.sum())
    return Q.QuantizedDist(order=order, weights=w, escape=escape, vocab_size=vocab)


def token_cost_bits(pos: Position, token: int) -> np.ndarray:
    """Exact coding cost of `token` in every mode (bits), for choosing the mode per chunk.

    The frequency mix_dist would give the token, without building the 49,152-entry tables
    (7 of them per token cost the encoder ~2 ms): a token's frequency needs only its own
    entries and the table's size. A token in the plain table's tail is priced through the
    table itself (its escape depends on every entry)."""
    out = np.empty(len(TAUS) + 1)
    plain = pos.plain_dist
    out[PLAIN] = plain.cost_bits(token)
    at_plain = pos.plain_index[token]
    dense_tok = int(plain.weights[at_plain]) + 1 if at_plain >= 0 else _tail_share(plain)
    for m in range(len(TAUS)):
        k, w1 = _stage1_weights(pos, m)
        ids1 = pos.ids[:k]
        hit = np.flatnonzero(ids1 == token)
        if not hit.size and at_plain < 0:
            out[m] = mix_dist(pos, m).cost_bits(token)
            continue
        a = LAMBDAS[m]
        b = 256 - a
        size = k + plain.order.size - int(np.count_nonzero(pos.plain_index[ids1] >= 0))  # mix_dist's order.size
        f = a * (int(w1[hit[0]]) + 1) + b * dense_tok if hit.size else b * dense_tok
        out[m] = -math.log2((_mix_weights(f, size) + 1) / TOTAL)
    return out


def mode_dist(pos: Position, mode: int) -> Q.QuantizedDist:
    """The table a token is coded under in this mode."""
    return pos.plain_dist if mode == PLAIN else mix_dist(pos, mode)


class _CoupledState(WeakModelState):
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
        """Perturbed-score levels before generated token number `index` (incremental path)."""
        c = self.codec
        t0 = time.perf_counter()
        if self._session is None:
            self._session = self.model.session(self.prompt + self.history)
            self._pending = []
        for tok in self._pending:
            self._session.feed(tok)
        self._pending = []
        logits = self._session.logits()
        freqs = self._session.frequencies()
        c.stats.model_s += time.perf_counter() - t0
        return self._levels(logits, index, freqs)

    def _levels(self, logits: np.ndarray, index: int, freqs: Any = None) -> Position:
        c = self.codec
        t1 = time.perf_counter()
        t = c.temperature / c.weak_temperature_ratio if c.temperature > 0 else 0.0
        s = coupled_scores(logits, t, c.seed, index)
        plain = np.asarray(logits, dtype=np.float32) if t <= 0 else (np.asarray(logits, dtype=np.float32) / np.float32(t))
        pos = position_levels(s, plain, None if freqs is None else np.asarray(freqs))
        c.stats.codec_s += time.perf_counter() - t1
        return pos

    def _teacher_forced_rows(self, tokens: list[int]) -> list[Position]:
        """One batched pass over a chunk (encoder only)."""
        t0 = time.perf_counter()
        logits = self.model.score_fast(self.prompt + self.history, tokens)
        # Exact models: the batched tables and logits are the session's, bit for bit.
        freqs = self.model.score_frequencies(self.prompt + self.history, tokens)
        self.codec.stats.model_s += time.perf_counter() - t0
        return [self._levels(row, len(self.history) + i, None if freqs is None else freqs[i]) for i, row in enumerate(logits)]

    # -- encoder
    def observe(self, token: int) -> None:
        if self._use_teacher_forced():
            return
        self._rows.append(self._position(len(self.history) + len(self._rows)))
        self._pending.append(int(token))

    def encode_chunk(self, tokens: Sequence[int]) -> tuple[int, bytes]:
        tokens = [int(t) for t in tokens]
        for tok in tokens:
            if not 0 <= tok < self.model.vocab_size:
                raise ValueError(f"token id {tok} is outside the weak model's vocabulary")
        if self._use_teacher_forced():
            rows = self._teacher_forced_rows(tokens)
        else:
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
            steps.append((mode_dist(pos, tau), tok))
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
            tok = dec.decode(mode_dist(pos, param))
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

    # -- progressive coding (stream format v2, codec/stream.py): the same tables per token
    n_params = PLAIN + 1

    @property
    def progressive(self) -> bool:
        from exfilguard.codec.codecs import tables_exact

        return tables_exact(self.model)

    def segment_rows(self, tokens: Sequence[int]) -> list[Position]:
        """Encoder: the positions of a segment's tokens (as encode_chunk); history unchanged."""
        tokens = [int(t) for t in tokens]
        for tok in tokens:
            if not 0 <= tok < self.model.vocab_size:
                raise ValueError(f"token id {tok} is outside the weak model's vocabulary")
        if self._use_teacher_forced():
            return self._teacher_forced_rows(tokens)
        if len(self._rows) != len(tokens):  # tokens pushed without observe()
            self._rows = []
            for tok in tokens:
                self.observe(tok)
        rows, self._rows = self._rows, []
        return rows

    def param_costs(self, rows: Sequence[Position], tokens: Sequence[int]) -> np.ndarray:
        """Bits of the segment in every mode (the encoder picks one per segment)."""
        t0 = time.perf_counter()
        costs = np.zeros(len(TAUS) + 1)
        for pos, tok in zip(rows, tokens):
            costs += token_cost_bits(pos, tok)
        if self.codec.tau is not None:
            costs = np.where(np.arange(costs.size) == self.codec.tau, costs, np.inf)
        self.codec.stats.codec_s += time.perf_counter() - t0
        return costs

    def row_dist(self, row: Position, param: int) -> Q.QuantizedDist:
        t0 = time.perf_counter()
        out = mode_dist(row, param)
        self.codec.stats.codec_s += time.perf_counter() - t0
        return out

    def commit_tokens(self, tokens: Sequence[int], rows: Sequence[Position] = ()) -> None:
        """Encoder: the segment was coded; its tokens become history."""
        for pos, tok in zip(rows, tokens):
            self.codec.stats.agreements += int(pos.ids[0] == tok)
        self.codec.stats.tokens += len(tokens)
        self.history += [int(t) for t in tokens]

    def next_row(self) -> Position:
        """Decoder: the position of the next token (runs the weak model)."""
        return self._position(len(self.history))

    def accept(self, token: int) -> None:
        """Decoder: the token at that position."""
        self.history.append(int(token))
        self._pending.append(int(token))


@dataclass
class CoupledStats(CodecStats):
    agreements: int = 0  # encoder: tokens equal to the weak model's perturbed argmax


@dataclass
class CoupledCodec(Codec):
    """Range coding of the strong model's seeded samples given the shared Gumbel noise.

    Unbound (seed None) it is a template: `for_request(seed, temperature, top_p)` gives the
    per-request codec that streams are made with. tau: force a mode (None: the encoder picks
    the cheapest per chunk). teacher_forced: the encoder scores each chunk in one batched
    `score_fast` pass instead of token by token (the decoder is always incremental; the grid
    absorbs the small float differences and the chunk checks catch the rest). weak_temperature_ratio: the weak scores use
    temperature T / ratio (1.0: the strong model's T)."""

    model: Any
    seed: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    tau: int | None = None
    weak_temperature_ratio: float = 1.0
    teacher_forced: bool = False
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


