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
