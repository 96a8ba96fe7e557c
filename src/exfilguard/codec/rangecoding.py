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


def _encode_one(enc, dist: QuantizedDist, token: int) -> None:
    pos = dist.position(token)
    k = dist.order.size
    if pos >= 0:
        enc.encode(pos, _Categorical(dist.probs32(), perfect=False))
        return
    if dist.tail_size < 1 or not 0 <= token < dist.vocab_size:
        raise ValueError(f"token {token} is outside the model's vocabulary")
    enc.encode(k, _Categorical(dist.probs32(), perfect=False))
    if dist.tail_size >= 2:
        enc.encode(dist.tail_index(token), _Uniform(dist.tail_size))


def _decode_one(dec, dist: QuantizedDist) -> int:
    sym = int(dec.decode(_Categorical(dist.probs32(), perfect=False)))
    k = dist.order.size
    if sym < k:
        return int(dist.order[sym])
    if dist.tail_size < 1:
        raise FrameCorrupt("escape symbol decoded where the model has no tail")
    idx = int(dec.decode(_Uniform(dist.tail_size))) if dist.tail_size >= 2 else 0
    return dist.tail_token(idx)


def _words(payload: bytes) -> np.ndarray:
    pad = payload + b"\x00" * (-len(payload) % 4)
    return np.frombuffer(pad, dtype=">u4").astype(np.uint32)


def _decodes_to(payload: bytes, steps: list[tuple[QuantizedDist, int]]) -> bool:
    dec = _queue.RangeDecoder(_words(payload))
    try:
        return all(_decode_one(dec, dist) == tok for dist, tok in steps)
    except Exception:  # a candidate tail that decodes to nonsense
        return False


def encode_steps(steps: list[tuple[QuantizedDist, int]]) -> bytes:
    """Range-code each token under its distribution; the shortest verified byte string."""
    if not steps:
        return b""
    enc = _queue.RangeEncoder()
    for dist, tok in steps:
        _encode_one(enc, dist, int(tok))
    full = enc.get_compressed().astype(">u4").tobytes().rstrip(b"\x00")
    best = full
    # Try dropping the last 1..4 bytes (as is, or with the kept prefix incremented).
    for cut in range(1, min(4, len(full)) + 1):
        prefix = full[:-cut]
        cands = [prefix]
        if prefix:
            val = int.from_bytes(prefix, "big") + 1
            if val < 1 << (8 * len(prefix)):
                cands.append(val.to_bytes(len(prefix), "big"))
        found = None
        for c in cands:
            c = c.rstrip(b"\x00")
            if len(c) < len(best) and _decodes_to(c, steps):
                found = c
                break
        if found is not None:
            best = found
    return best


class StepDecoder:
    """Decodes one token at a time from a payload; the caller supplies each distribution."""

    def __init__(self, payload: bytes):
        self._dec = _queue.RangeDecoder(_words(payload))

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
