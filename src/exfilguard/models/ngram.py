"""A token n-gram weak model: interpolated modified Kneser-Ney in integer arithmetic.

Every number on the prediction path is an integer, so `frequencies()` is bit-exact on every
machine, in every process, with any numpy build: the codec can use it as-is.

The model (Chen & Goodman's interpolated modified KN). For a context h of length k-1 over token
ids, with counts c(h, w) (raw counts at the top order, continuation counts N1+(. h w) below):

    P_k(w | h) = max(c(h,w) - D(c(h,w)), 0) / c(h)  +  B(h) / c(h) * P_{k-1}(w | h')
    B(h)       = D1 * N1(h) + D2 * N2(h) + D3 * N3+(h)

with discounts D1, D2, D3 per order in units of 1/DISCOUNT_DEN; P_0 is uniform. A context the
model never saw leaves the lower order unchanged (it backs off). Probabilities are carried as
fixed-point integers of total SCALE = 2**30 and each level is evaluated as

    P_k[w] = (B_num(h) * P_{k-1}[w]) // den  +  (max(c*DEN - D, 0) * SCALE) // den,   den = c(h)*DEN

and the final frequencies are f = 1 + (P * (FREQ_TOTAL - V)) // SCALE, with the rounding deficit
added to the most probable token (lowest id on ties), so f.sum() == FREQ_TOTAL == 2**24 exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exfilguard.errors import ConfigError
from exfilguard.models.base import LanguageModel, ModelInfo, Session
from exfilguard.models.fingerprint import fingerprint
from exfilguard.models.npzfile import read_model_npz

FORMAT = "exfilguard-ngram-v1"
SCALE_BITS = 30
SCALE = 1 << SCALE_BITS
FREQ_BITS = 24
FREQ_TOTAL = 1 << FREQ_BITS  # what frequencies() always sums to
DISCOUNT_DEN = 1024
VOCAB_SIZE = 49152
EOS_TOKEN_IDS = (2,)
MAX_ORDER = 5  # contexts of up to 4 ids of 16 bits each pack into one uint64
_MAX_COUNT = 1 << 21  # keeps c * DEN * SCALE inside int64


def _pack(ctx: Sequence[int]) -> int:
    """A context (up to 4 token ids < 2**16) as one integer key; the last id in the low bits."""
    key = 0
    for t in ctx:
        key = (key << 16) | int(t)
    return key


@dataclass
class _Level:
    """Counts for contexts of one length: a CSR table from packed context to (next id, count)."""

    keys: np.ndarray  # uint64 [n_ctx], sorted
    offsets: np.ndarray  # int64 [n_ctx + 1]
    next_ids: np.ndarray  # int32 [n_entries]
    counts: np.ndarray  # int64 [n_entries]
    totals: np.ndarray  # int64 [n_ctx]: c(h)
    backoff: np.ndarray  # int64 [n_ctx]: B(h) in units of 1/DISCOUNT_DEN
    discounts: np.ndarray  # int64 [3]: D1, D2, D3+ in units of 1/DISCOUNT_DEN

    def find(self, key: int) -> int:
        i = int(np.searchsorted(self.keys, np.uint64(key)))
        if i < len(self.keys) and int(self.keys[i]) == key:
            return i
        return -1


def _discounts(counts: np.ndarray) -> np.ndarray:
    """Modified-KN discounts D1, D2, D3+ (Chen & Goodman) from count-of-counts, as integers."""
    n = [int(np.count_nonzero(counts == r)) for r in (1, 2, 3, 4)]
    if min(n) == 0:
        d = [0.5, 1.0, 1.5]
    else:
        y = n[0] / (n[0] + 2 * n[1])
        d = [1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2]]
    out = []
    for c, v in zip((1, 2, 3), d, strict=True):
        out.append(min(max(int(round(v * DISCOUNT_DEN)), 1), c * DISCOUNT_DEN - 1))
    return np.array(out, dtype=np.int64)


def _level_from_pairs(ctx_keys: np.ndarray, next_ids: np.ndarray, counts: np.ndarray) -> _Level:
    """Build one level from unique (context, next) pairs sorted by context then next id."""
    keys, starts = np.unique(ctx_keys, return_index=True)
    offsets = np.append(starts, len(ctx_keys)).astype(np.int64)
    counts = counts.astype(np.int64)
    disc = _discounts(counts)
    per_entry_d = disc[np.minimum(counts, 3) - 1]
    totals = np.add.reduceat(counts, starts) if len(starts) else np.zeros(0, np.int64)
    backoff = np.add.reduceat(per_entry_d, starts) if len(starts) else np.zeros(0, np.int64)
    if len(totals) and int(totals.max()) >= _MAX_COUNT:
        raise ConfigError("n-gram counts too large for exact int64 arithmetic; use a smaller corpus")
    return _Level(keys.astype(np.uint64), offsets, next_ids.astype(np.int32), counts, totals, backoff, disc)


def _mix(lower: np.ndarray, level: _Level, i: int) -> np.ndarray:
    """One interpolation step: P_k from P_{k-1} for the context at row i of `level`."""
    den = int(level.totals[i]) * DISCOUNT_DEN
    out = (lower * int(level.backoff[i])) // den
    a, b = int(level.offsets[i]), int(level.offsets[i + 1])
    c = level.counts[a:b]
    d = level.discounts[np.minimum(c, 3) - 1]
    out[level.next_ids[a:b]] += ((c * DISCOUNT_DEN - d) * SCALE) // den
    return out


def _to_frequencies(p: np.ndarray) -> np.ndarray:
    f = 1 + (p * (FREQ_TOTAL - len(p))) // SCALE
    deficit = FREQ_TOTAL - int(f.sum())
    f[int(np.argmax(f))] += deficit
    return f.astype(np.uint32)


class NGramModel(LanguageModel):
    """An interpolated modified-KN n-gram over SmolLM2 token ids, exact integer arithmetic."""

    def __init__(self, spec: str, order: int, levels: list[_Level], vocab_size: int = VOCAB_SIZE):
        if not 1 <= order <= MAX_ORDER or len(levels) != order:
            raise ConfigError(f"n-gram order must be 1..{MAX_ORDER} with one table per order")
        self.order = order
        self.levels = levels  # levels[k]: contexts of length k (levels[0]: the empty context)
        self.vocab = vocab_size
        uniform = np.full(vocab_size, SCALE // vocab_size, dtype=np.int64)
        self._base = _mix(uniform, levels[0], 0) if len(levels[0].keys) else uniform
        arrays: dict[str, np.ndarray] = {}
        for k, lv in enumerate(levels):
            for name in ("keys", "offsets", "next_ids", "counts", "backoff", "discounts"):
                arrays[f"{k}.{name}"] = getattr(lv, name)
        fp = fingerprint(arrays, _tokenizer_digest(), {"kind": "ngram", "format": FORMAT, "order": order})
        self.info = ModelInfo(spec=spec, fingerprint=fp, vocab_size=vocab_size, eos_token_ids=EOS_TOKEN_IDS)

    def probabilities(self, context: Sequence[int]) -> np.ndarray:
        """Fixed-point next-token probabilities (int64 [vocab], sum <= SCALE) after `context`."""
        p = self._base
        for k in range(1, self.order):
            if len(context) < k:
                break
            i = self.levels[k].find(_pack(context[len(context) - k :]))
            if i < 0:
                break  # a longer context containing an unseen one is unseen too
            p = _mix(p, self.levels[k], i)
        return p

    def frequencies(self, context: Sequence[int]) -> np.ndarray:
        """Exact uint32 frequencies summing to FREQ_TOTAL (2**24), every entry >= 1."""
        return _to_frequencies(self.probabilities(context))

    def session(self, prefix_ids: Sequence[int]) -> NGramSession:
        return NGramSession(self, prefix_ids)

    def save(self, path: str | Path) -> None:
        """Write the tables to one .npz file (uncompressed: it loads fast and hashes stably)."""
        arrays: dict[str, np.ndarray] = {"meta": np.frombuffer(json.dumps({"format": FORMAT, "order": self.order, "vocab_size": self.vocab}).encode(), dtype=np.uint8)}
        for k, lv in enumerate(self.levels):
            arrays[f"{k}.keys"] = lv.keys
            arrays[f"{k}.offsets"] = lv.offsets.astype(np.int64)
            arrays[f"{k}.next_ids"] = lv.next_ids.astype(np.uint16)
            arrays[f"{k}.counts"] = lv.counts.astype(np.uint32)
            arrays[f"{k}.discounts"] = lv.discounts
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)


class NGramSession(Session):
    """Keeps the last order-1 ids; each step is a few sparse lookups and dense integer mixes."""

    def __init__(self, model: NGramModel, prefix_ids: Sequence[int]):
        self._m = model
        self._ctx = [int(t) for t in prefix_ids][-(model.order - 1) :] if model.order > 1 else []
        self._len = len(prefix_ids)
        self._freq: np.ndarray | None = None

    def frequencies(self) -> np.ndarray:
        """uint32 [vocab], every entry >= 1, summing to exactly 2**24 on every machine."""
        if self._freq is None:
            self._freq = self._m.frequencies(self._ctx)
        return self._freq

    def logits(self) -> np.ndarray:
        return np.log(self.frequencies().astype(np.float64)).astype(np.float32)

    def feed(self, token_id: int) -> None:
        if self._m.order > 1:
            self._ctx = (self._ctx + [int(token_id)])[-(self._m.order - 1) :]
        self._len += 1
        self._freq = None

    @property
    def length(self) -> int:
        return self._len


def _tokenizer_digest() -> bytes:
    """Digest of the shipped tokenizer file (the n-gram never loads the tokenizer itself)."""
    from exfilguard.models.hf import TOKENIZER_DIR

    return hashlib.sha256((TOKENIZER_DIR / "tokenizer.json").read_bytes()).digest()


def train_ngram(
    sequences: Iterable[tuple[Sequence[int], Sequence[int]]],
    order: int = 4,
    vocab_size: int = VOCAB_SIZE,
    spec: str = "ngram",
    include_prompt: bool = False,
) -> NGramModel:
    """Count n-grams over (prompt_ids, token_ids) pairs and return the KN model.

    Only generated tokens are predicted unless `include_prompt`; the prompt is always context."""
    if not 1 <= order <= MAX_ORDER:
        raise ConfigError(f"n-gram order must be 1..{MAX_ORDER}, got {order}")
    grams: list[np.ndarray] = []  # rows of `order` ids: context then next
    for prompt, gen in sequences:
        seq = np.asarray(list(prompt) + list(gen), dtype=np.int64)
        if seq.size and int(seq.max()) >= vocab_size:
            raise ConfigError(f"token id {int(seq.max())} outside the vocabulary of {vocab_size}")
        first = max(order - 1, 0 if include_prompt else len(prompt))
        first = max(first, order - 1)
        if len(seq) <= first:
            continue
        idx = np.arange(first, len(seq))[:, None] + np.arange(-(order - 1), 1)[None, :]
        grams.append(seq[idx])
    if not grams:
        raise ConfigError("the corpus has no tokens to count")
    top = np.concatenate(grams)
    levels: list[_Level | None] = [None] * order
    # Top order: raw counts. Lower orders: continuation counts (distinct left extensions).
    unique, counts = np.unique(top, axis=0, return_counts=True)
    for k in range(order - 1, -1, -1):
        ctx = unique[:, :k]
        ctx_keys = np.zeros(len(unique), dtype=np.uint64)
        for j in range(k):
            ctx_keys = (ctx_keys << np.uint64(16)) | ctx[:, j].astype(np.uint64)
        levels[k] = _level_from_pairs(ctx_keys, unique[:, k], counts)
        if k == 0:
            break
        # The next level down counts each distinct (k)-gram once per distinct left id.
        unique, counts = np.unique(unique[:, 1:], axis=0, return_counts=True)
    return NGramModel(spec, order, [lv for lv in levels if lv is not None], vocab_size)


def load_ngram(path: str | Path, spec: str | None = None) -> NGramModel:
    """Load a model written by NGramModel.save (exfilguard distill --kind ngram)."""
    meta, z = read_model_npz(path, "n-gram", FORMAT)
    order = int(meta["order"])
    levels = []
    for k in range(order):
        keys, offsets = z[f"{k}.keys"], z[f"{k}.offsets"]
        next_ids = z[f"{k}.next_ids"].astype(np.int32)
        counts = z[f"{k}.counts"].astype(np.int64)
        disc = z[f"{k}.discounts"].astype(np.int64)
        starts = offsets[:-1]
        totals = np.add.reduceat(counts, starts) if len(starts) else np.zeros(0, np.int64)
        per = disc[np.minimum(counts, 3) - 1]
        backoff = np.add.reduceat(per, starts) if len(starts) else np.zeros(0, np.int64)
        levels.append(_Level(keys.astype(np.uint64), offsets.astype(np.int64), next_ids, counts, totals, backoff, disc))
    return NGramModel(spec or f"ngram:{path}", order, levels, int(meta["vocab_size"]))


def _loader(path: str, options: object) -> LanguageModel:
    return load_ngram(path, f"ngram:{path}")
