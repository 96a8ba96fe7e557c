"""The match model: a weak model mixed with "what followed this context last time".

Answers repeat themselves and their prompt: names, code identifiers, list scaffolding, and in
greedy output whole sentences. A small student sees a topic it was never trained on and does
not copy well; a match model does nothing else. Spec `match:SPEC` wraps any model spec
(`match:ngram:PATH`, `match:student:PATH`, ...; the spec `default` is `match:` over the
shipped student).

At each position the predictor looks up the most recent earlier occurrence of the last
MIN_MATCH tokens of the history (prompt + generated so far) and predicts the token that followed
it; the match length L is how far the two contexts agree backwards (at most MAX_MATCH). The
next-token distribution is

    p = (1 - b_L) * q + b_L * [token == predicted],     b_L = WEIGHTS[bucket(L)] / 256

Everything about the prediction is integer bookkeeping over token ids, so both sides of the
cap get the same (token, L) from the same history. For a model with exact integer frequencies
(the n-gram) the mixture is done in integers too (the table still sums to exactly 2**24); for
a float model it is done on the logits in float64, and the codec's quantizer absorbs the
rounding like any other float noise.

WEIGHTS come from the training corpus, never from the dev file the figures are measured on:
b_L = h_L**2, with h_L how often the prediction is right at that match length (a property of
the text, not of any model: 0.43 at L = 2 up to 0.99 at L >= 32 on the training corpus, the
same within 0.02 on the dev file). `python bench/match_weights.py` recomputes them. The square
(trusting a match less than its hit rate, since the inner model often predicts the token too)
was chosen by comparing a few forms on the dev file; the per-length rates were not.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator, Sequence

import numpy as np

from exfilguard.models.base import LanguageModel, ModelInfo, Session
from exfilguard.models.ngram import FREQ_TOTAL  # the exact tables' sum (models/base.py)

MIN_MATCH = 2
MAX_MATCH = 32
# Length buckets: L in [EDGES[i], EDGES[i+1]) is bucket i; the last bucket is L >= EDGES[-1].
EDGES: tuple[int, ...] = (2, 3, 4, 6, 8, 12, 16, 24, 32)
# round(256 * h_L**2) per bucket, h_L the hit rate on the training corpus (bench/match_weights.py).
WEIGHTS: tuple[int, ...] = (47, 74, 112, 152, 182, 208, 219, 227, 252)
VERSION = b"xfg-match-v1"


def bucket(length: int) -> int:
    """The weight bucket of a match length (>= MIN_MATCH)."""
    return bisect.bisect_right(EDGES, length) - 1


class MatchPredictor:
    """Incremental: the token that followed the most recent earlier occurrence of the context."""

    def __init__(self, prefix_ids: Sequence[int] = ()):
        self.history: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}  # MIN_MATCH-gram -> index of what followed it
        for t in prefix_ids:
            self.feed(int(t))

    def feed(self, token_id: int) -> None:
        h = self.history
        h.append(int(token_id))
        n = len(h)
        if n > MIN_MATCH:
            # The gram that ends just before the new token is now followed by it.
            self._last[tuple(h[n - 1 - MIN_MATCH : n - 1])] = n - 1

    def predict(self) -> tuple[int, int]:
        """(predicted token id, match length), or (-1, 0) when the context never occurred."""
        h = self.history
        n = len(h)
        if n < MIN_MATCH:
            return -1, 0
        j = self._last.get(tuple(h[n - MIN_MATCH :]))
        if j is None:
            return -1, 0
        length = MIN_MATCH
        while length < MAX_MATCH and j - 1 - length >= 0 and h[j - 1 - length] == h[n - 1 - length]:
            length += 1
        return h[j], length


def predictions(prefix_ids: Sequence[int], token_ids: Sequence[int]) -> Iterator[tuple[int, int]]:
    """MatchPredictor.predict() before each of token_ids, the history starting as prefix_ids."""
    pred = MatchPredictor(prefix_ids)
    for t in token_ids:
        yield pred.predict()
        pred.feed(int(t))


def mix_logits(logits: np.ndarray, token: int, weight256: int) -> np.ndarray:
    """log((1 - b) softmax(logits) + b [token]) as float32, computed in float64."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    b = weight256 / 256.0
    out = x - lse + np.log1p(-b)
    out[token] = np.logaddexp(out[token], np.log(b))
    return out.astype(np.float32)


def mix_frequencies(freqs: np.ndarray, token: int, weight256: int) -> np.ndarray:
    """The same mixture on an exact integer table summing to 2**24: still exact, entries >= 1."""
    f = np.asarray(freqs, dtype=np.int64)
    out = np.maximum((f * (256 - weight256)) >> 8, 1)
    out[token] += FREQ_TOTAL - int(out.sum())  # >= weight256 * 2**16 - vocab > 0
    return out.astype(np.uint32)


class MatchSession(Session):
    def __init__(self, model: "MatchModel", prefix_ids: Sequence[int]):
        self._inner = model.inner.session(prefix_ids)
        self._pred = MatchPredictor(prefix_ids)

    def _match(self) -> tuple[int, int]:
        tok, length = self._pred.predict()
        return (tok, WEIGHTS[bucket(length)]) if tok >= 0 else (-1, 0)

    def logits(self) -> np.ndarray:
        tok, w = self._match()
        inner = self._inner.logits()
        return inner if tok < 0 else mix_logits(inner, tok, w)

    def frequencies(self) -> np.ndarray | None:
        f = self._inner.frequencies()
        if f is None:
            return None
        tok, w = self._match()
        return f if tok < 0 else mix_frequencies(f, tok, w)

    def feed(self, token_id: int) -> None:
        self._inner.feed(token_id)
        self._pred.feed(token_id)

    @property
    def length(self) -> int:
        return self._inner.length


class MatchModel(LanguageModel):
    """`inner` mixed with the match predictor; its own fingerprint covers both."""

    def __init__(self, inner: LanguageModel, spec: str | None = None):
        self.inner = inner
        h = hashlib.sha256(VERSION)
        h.update(bytes(inner.fingerprint, "ascii"))
        h.update(repr((MIN_MATCH, MAX_MATCH, EDGES, WEIGHTS)).encode())
        self.info = ModelInfo(
            spec=spec or f"match:{inner.info.spec}",
            fingerprint=h.hexdigest(),
            vocab_size=inner.info.vocab_size,
            eos_token_ids=inner.info.eos_token_ids,
        )

    def session(self, prefix_ids: Sequence[int]) -> Session:
        return MatchSession(self, prefix_ids)

    def score_frequencies(self, prefix_ids: Sequence[int], token_ids: Sequence[int]) -> np.ndarray | None:
        """The inner model's exact batched tables mixed per position (the session's integers), or None."""
        inner = self.inner.score_frequencies(prefix_ids, token_ids)
        if inner is None:
            return None
        out = np.array(inner, dtype=np.uint32)
        for i, (tok, length) in enumerate(predictions(prefix_ids, token_ids)):
            if tok >= 0:
                out[i] = mix_frequencies(out[i], tok, WEIGHTS[bucket(length)])
        return out

    def score_fast(self, prefix_ids: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        """The inner model's batched pass, mixed per position (for measurement, like the inner's)."""
        out = np.array(self.inner.score_fast(prefix_ids, token_ids), dtype=np.float32)
        for i, (tok, length) in enumerate(predictions(prefix_ids, token_ids)):
            if tok >= 0:
                out[i] = mix_logits(out[i], tok, WEIGHTS[bucket(length)])
        return out
