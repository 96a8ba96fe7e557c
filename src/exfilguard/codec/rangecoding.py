"""Range coding of QuantizedDist symbols with constriction, and a short seal.

Words are serialized big-endian so that the sealed tail tends to end in zero bytes, which are
dropped (the decoder zero-pads). The encoder then tries shorter tails (cut, or cut and
increment) and keeps the shortest one that decodes to the same symbols; it checks each
candidate by decoding it, so the result is correct by construction.
"""

from __future__ import annotations

from collections.abc import Callable

import constriction
import numpy as np

from exfilguard.codec.quantizer import QuantizedDist
from exfilguard.errors import FrameCorrupt

_Categorical = constriction.stream.model.Categorical
_Uniform = constriction.stream.model.Uniform
_queue = constriction.stream.queue


def _model(dist: QuantizedDist):  # noqa: ANN202 (constriction has no type stubs)
    return _Categorical(dist.probs32(), perfect=False)


def _encode_one(enc, dist: QuantizedDist, model, token: int) -> None:  # noqa: ANN001
    pos = dist.position(token)
    if pos >= 0:
        enc.encode(pos, model)
        return
    if dist.tail_size < 1 or not 0 <= token < dist.vocab_size:
        raise ValueError(f"token {token} is outside the model's vocabulary")
    enc.encode(dist.order.size, model)
    if dist.tail_size >= 2:
        enc.encode(dist.tail_index(token), _Uniform(dist.tail_size))


class PayloadUndecodable(FrameCorrupt):
    """A chunk's range-coded payload is not valid under the weak model (garbage, or a desync)."""


def _decode_symbol(dec, model) -> int:  # noqa: ANN001
    """One symbol; every constriction failure (it raises AssertionError, ValueError, ...) as PayloadUndecodable."""
    try:
        return int(dec.decode(model))
    except Exception as exc:  # constriction's errors have no common base; all mean "not our payload"
        raise PayloadUndecodable(f"range decoder rejected the payload: {type(exc).__name__}: {exc}") from exc


def _decode_one(dec, dist: QuantizedDist, model=None) -> int:  # noqa: ANN001
    sym = _decode_symbol(dec, model if model is not None else _model(dist))
    k = dist.order.size
    if sym < k:
        return int(dist.order[sym])
    if dist.tail_size < 1:
        raise PayloadUndecodable("escape symbol decoded where the model has no tail")
    idx = _decode_symbol(dec, _Uniform(dist.tail_size)) if dist.tail_size >= 2 else 0
    return dist.tail_token(idx)


def _words(payload: bytes) -> np.ndarray:
    pad = payload + b"\x00" * (-len(payload) % 4)
    return np.frombuffer(pad, dtype=">u4").astype(np.uint32)


def _decodes_to(payload: bytes, steps: list[tuple[QuantizedDist, int]], models: list) -> bool:  # noqa: ANN001
    dec = _queue.RangeDecoder(_words(payload))
    try:
        return all(_decode_one(dec, dist, m) == tok for (dist, tok), m in zip(steps, models))
    except PayloadUndecodable:  # a candidate tail that decodes to nonsense
        return False


def encode_steps(steps: list[tuple[QuantizedDist, int]]) -> bytes:
    """Range-code each token under its distribution; the shortest verified byte string."""
    if not steps:
        return b""
    enc = _queue.RangeEncoder()
    models = [_model(dist) for dist, _ in steps]
    for (dist, tok), m in zip(steps, models):
        _encode_one(enc, dist, m, int(tok))
    full = enc.get_compressed().astype(">u4").tobytes().rstrip(b"\x00")
    # Shortest first: drop the last 4..1 bytes, with the kept prefix incremented or as is.
    for cut in range(min(4, len(full)), 0, -1):
        prefix = full[:-cut]
        cands = []
        if prefix:
            val = int.from_bytes(prefix, "big") + 1
            if val < 1 << (8 * len(prefix)):
                cands.append(val.to_bytes(len(prefix), "big").rstrip(b"\x00"))
        cands.append(prefix.rstrip(b"\x00"))
        for c in sorted(set(cands), key=len):
            if _decodes_to(c, steps, models):
                return c
    return full


class StepDecoder:
    """Decodes one token at a time from a payload; the caller supplies each distribution."""

    def __init__(self, payload: bytes):
        try:
            self._dec = _queue.RangeDecoder(_words(payload))
        except Exception as exc:  # constriction refusing the word array
            raise PayloadUndecodable(f"range decoder rejected the payload: {exc}") from exc

    def decode(self, dist: QuantizedDist) -> int:
        return _decode_one(self._dec, dist)


def decode_steps(payload: bytes, count: int, next_dist: Callable[[int], QuantizedDist], on_token: Callable[[int], None]) -> list[int]:
    """Decode `count` tokens; next_dist(i) gives the distribution before token i."""
    dec = StepDecoder(payload)
    out = []
    for i in range(count):
        tok = dec.decode(next_dist(i))
        out.append(tok)
        on_token(tok)
    return out


# ---------------------------------------------------------------- settling range coder (v2)
#
# Stream format v2 needs what constriction's queue coder does not offer: output that can be
# shipped while coding goes on, without sealing. This coder keeps the interval exactly as
# integers, [low, low + rng) in units of 2**-(8 * (emitted + width)), and emits a byte only
# once every value in the interval agrees on it ("settled"): a later carry can never reach an
# emitted byte, so the bytes out so far are a prefix of the final stream. Python ints hold any
# run of pending carry bytes (the outstanding-bytes case) without special handling.

RANGE_FLOOR = 1 << 48  # rng stays >= 2**48, so a 2**24 total loses < 2**-24 of it to rounding
_START_WIDTH = 7  # the first interval is [0, 2**56)
MAX_TOTAL = 1 << 24


class _Interval:
    """The coder's interval [low, low + rng) over a window of `width` bytes; the encoder and the
    decoder narrow it with the same code, so they cannot drift apart."""

    def __init__(self) -> None:
        self.low = 0
        self.rng = 1 << (8 * _START_WIDTH)
        self.width = _START_WIDTH

    def _narrow(self, cum: int, freq: int, total: int) -> bytearray:
        """Narrow to the symbol's interval; return the bytes that settled (they leave the window)."""
        r = self.rng // total
        self.low += r * cum
        # The last symbol takes the rounding remainder, so the interval is always used in full.
        self.rng = r * freq if cum + freq < total else self.rng - r * cum
        while self.rng < RANGE_FLOOR:
            self.low <<= 8
            self.rng <<= 8
            self.width += 1
        shift = 8 * (self.width - 1)
        settled = bytearray()
        while True:
            b = self.low >> shift
            if b != (self.low + self.rng - 1) >> shift:
                return settled
            settled.append(b)
            self.low -= b << shift
            self.width -= 1
            shift -= 8


class SettlingEncoder(_Interval):
    """Range encoder: `encode(cum, freq, total)` per symbol, `take()` the settled bytes so far,
    `finish()` once for the shortest tail that pins the final interval (zero-padded)."""

    def __init__(self) -> None:
        super().__init__()
        self._out = bytearray()

    def encode(self, cum: int, freq: int, total: int) -> None:
        """Code the symbol with cumulative `cum` and frequency `freq` out of `total` (<= 2**24)."""
        if not (0 <= cum and 0 < freq and cum + freq <= total <= MAX_TOTAL):
            raise ValueError(f"bad symbol interval {cum}+{freq} of {total}")
        self._out += self._narrow(cum, freq, total)

    def take(self) -> bytes:
        """The bytes settled since the last take(): final, whatever is coded next."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def finish(self) -> bytes:
        """Everything not yet taken plus the shortest tail (ending in a nonzero byte, so the
        stream's length is part of what it says). No symbol may follow."""
        out = bytes(self._out) + seal_tail(self.low, self.rng, self.width)
        self._out.clear()
        return out


def seal_tail(low: int, rng: int, width: int) -> bytes:
    """The fewest bytes t, the last one nonzero, such that t followed by zeros lies in
    [low, low + rng) (a window of `width` bytes). The nonzero end lets a decoder tell a
    truncated stream: a valid one never needs the zero padding past its own tail to settle."""
    for k in range(1, width + 1):
        unit = 1 << (8 * (width - k))
        v = -(-low // unit)  # ceil: the smallest k-byte prefix whose zero padding is >= low
        if not v & 0xFF:
            v += 1
        if v * unit < low + rng:
            return v.to_bytes(k, "big")
    raise AssertionError("unreachable: k = width always fits (rng >= 2**48)")  # pragma: no cover


class SettlingDecoder(_Interval):
    """Mirror of SettlingEncoder over the bytes received so far.

    A symbol is *determined* when every continuation of the received bytes decodes to it: the
    window's unknown bytes are taken as all 0x00 and all 0xFF, and both ends must fall in the same
    symbol's interval (the map from code value to symbol is monotone). After `end()` the unknown
    bytes are zeros, as the encoder's finish() assumed. Before the end a determined symbol
    never settles a byte that has not arrived (its interval holds every continuation of the
    received bytes); after it, settling past the last byte means the stream was cut."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = 0  # stream position of the window's first byte (= bytes settled)
        self.buf = bytearray()
        self.ended = False
        self._settled = bytearray()  # every settled byte, to check against what arrives
        self._checked = 0

    def feed(self, data: bytes) -> None:
        if self.ended:
            raise FrameCorrupt("bytes after the end of the codec stream")
        self.buf += data
        self._check_settled()

    def end(self) -> None:
        """No more bytes will come: the rest of the stream is zeros."""
        self.ended = True
        self._check_settled()

    def _check_settled(self) -> None:
        n = len(self._settled)
        if self.ended and n > len(self.buf):
            # A valid stream ends in its tail, past every byte its symbols settle: this one is cut.
            raise FrameCorrupt("codec stream truncated: its symbols run past its last byte")
        upto = n if self.ended else min(n, len(self.buf))
        if upto <= self._checked:
            return
        got = bytes(self.buf[self._checked : upto]).ljust(upto - self._checked, b"\x00")
        if got != bytes(self._settled[self._checked : upto]):
            raise FrameCorrupt("codec stream corrupt: a byte differs from what its decoded symbols imply")
        self._checked = upto

    def targets(self, total: int) -> tuple[int, int]:
        """The lowest and highest target in [0, total) the received bytes allow."""
        known = bytes(self.buf[self.pos : self.pos + self.width])
        free = 8 * (self.width - len(known))
        lo = int.from_bytes(known, "big") << free
        hi = lo if self.ended else lo + (1 << free) - 1
        if hi < self.low or lo >= self.low + self.rng:
            raise FrameCorrupt("codec stream corrupt: the code value left the coder's interval")
        r = self.rng // total
        t_lo = max(lo - self.low, 0) // r
        t_hi = (min(hi, self.low + self.rng - 1) - self.low) // r
        return min(t_lo, total - 1), min(t_hi, total - 1)

    def update(self, cum: int, freq: int, total: int) -> None:
        """Take the decoded symbol's interval (exactly what the encoder did)."""
        settled = self._narrow(cum, freq, total)
        if settled:
            self._settled += settled
            self.pos += len(settled)
            self._check_settled()

    def decode_table(self, cum: np.ndarray) -> int | None:
        """Symbol under a cumulative table (cum[0] = 0, cum[-1] = total), None if not determined."""
        total = int(cum[-1])
        t_lo, t_hi = self.targets(total)
        s = int(np.searchsorted(cum, t_lo, side="right")) - 1
        if t_hi >= int(cum[s + 1]):
            return None
        self.update(int(cum[s]), int(cum[s + 1] - cum[s]), total)
        return s

    def decode_uniform(self, n: int) -> int | None:
        """A symbol in [0, n) under the uniform table, None if not determined."""
        t_lo, t_hi = self.targets(n)
        if t_lo != t_hi:
            return None
        self.update(t_lo, 1, n)
        return t_lo

    def tail_matches(self) -> bool:
        """After end() and the last symbol: the received bytes are exactly the encoder's stream
        for these symbols (the settled bytes, checked as they settled, then the shortest tail)."""
        return bytes(self.buf[self.pos :]) == seal_tail(self.low, self.rng, self.width)


def uniform_symbol(enc: SettlingEncoder, value: int, n: int) -> None:
    """Code value in [0, n) uniformly (n <= 2**24)."""
    enc.encode(value, 1, n)


def dist_cumulative(dist: QuantizedDist) -> np.ndarray:
    """Cumulative table of a QuantizedDist in coding order, escape last: [0, ..., 2**24]."""
    cum = np.empty(dist.order.size + 2, dtype=np.int64)
    cum[0] = 0
    np.cumsum(dist.weights + 1, out=cum[1:-1])
    cum[-1] = cum[-2] + dist.escape + 1
    return cum


def encode_token(enc: SettlingEncoder, dist: QuantizedDist, token: int) -> None:
    """Code one token under its QuantizedDist (escape, then a uniform tail index, as v1)."""
    from exfilguard.codec.quantizer import TOTAL

    pos = dist.position(token)
    if pos >= 0:
        enc.encode(int(dist.weights[:pos].sum()) + pos, int(dist.weights[pos]) + 1, TOTAL)
        return
    if dist.tail_size < 1 or not 0 <= token < dist.vocab_size:
        raise ValueError(f"token {token} is outside the model's vocabulary")
    k = dist.order.size
    enc.encode(int(dist.weights.sum()) + k, dist.escape + 1, TOTAL)
    if dist.tail_size >= 2:
        enc.encode(dist.tail_index(token), 1, dist.tail_size)
