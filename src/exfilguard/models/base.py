"""The language-model interface both sides of the cap share.

A weak model must give the encoder (inside) and the decoder (outside) the same next-token
distribution bit for bit. The incremental path (`Session.feed` then `Session.logits`) is the
canonical one: the decoder can only ever use it, so the encoder uses it too unless a batched
teacher-forced pass is proven bit-identical (see `LanguageModel.score`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelInfo:
    """What identifies a model to the other side of the cap."""

    spec: str
    fingerprint: str  # hex SHA-256 over weights, tokenizer and the inference settings that matter
    vocab_size: int
    eos_token_ids: tuple[int, ...]

    @property
    def short_fingerprint(self) -> str:
        return self.fingerprint[:12]


class Session(ABC):
    """An incremental decoding state: the model has read a prefix and predicts the next token."""

    @abstractmethod
    def logits(self) -> np.ndarray:
        """Next-token logits (float32, shape [vocab]) given every token fed so far."""

    @abstractmethod
    def feed(self, token_id: int) -> None:
        """Append one token to the context (one incremental step, KV-cached where possible)."""

    def frequencies(self) -> np.ndarray | None:
        """Exact integer next-token frequencies (uint32 [vocab], every entry >= 1), or None.

        Models computed in integer arithmetic (the n-gram) return them so the codec can skip the
        float-to-integer quantization and is bit-exact on every machine. Contract: the sum is
        exactly 2**24 (`exfilguard.models.ngram.FREQ_TOTAL`), so the codec may use the table as-is
        with a 24-bit total; the same context gives the same bytes in any process or machine."""
        return None

    def feed_many(self, token_ids: Sequence[int]) -> None:
        """Append several tokens; subclasses may do it in one pass when that is bit-identical."""
        for t in token_ids:
            self.feed(int(t))

    @property
    @abstractmethod
    def length(self) -> int:
        """Number of tokens in the context."""


class LanguageModel(ABC):
    """A causal LM over the SmolLM2 token ids: incremental sessions and teacher-forced scoring."""

    info: ModelInfo

    @abstractmethod
    def session(self, prefix_ids: Sequence[int]) -> Session:
        """A session that has read `prefix_ids` (the prompt) and predicts the first new token."""

    def score(self, prefix_ids: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        """Logits before each of `token_ids` (float32 [n, vocab]) given the prefix.

        The default walks the incremental path, so it is bit-identical to what a decoder computes.
        Backends override it with one batched pass only where they prove that identity.
        """
        s = self.session(prefix_ids)
        out = np.empty((len(token_ids), self.info.vocab_size), dtype=np.float32)
        for i, t in enumerate(token_ids):
            out[i] = s.logits()
            s.feed(int(t))
        return out

    def score_frequencies(self, prefix_ids: Sequence[int], token_ids: Sequence[int]) -> np.ndarray | None:
        """Exact integer tables before each of `token_ids` ([n, vocab], as Session.frequencies)
        in one batched pass, bit-identical to the incremental session's; None when the model has
        no such pass (float models, and exact ones that only compute them incrementally)."""
        return None

    def score_fast(self, prefix_ids: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits in as few passes as possible; NOT guaranteed bit-identical to
        the incremental path. For measurement (ideal bits, KL), never for coding."""
        return self.score(prefix_ids, token_ids)

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size
