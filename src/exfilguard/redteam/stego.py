"""Hiding bits in the choice among likely tokens, and reading them back.

Both the attacker (inside) and the colluder (outside) run the same public model (the weak
model, which by design sits on both sides of the cap). At each position they rank its
next-token candidates the same way; the attacker emits the candidate whose index is the next
k secret bits, the colluder reads the index of the token it sees. Answers look like the weak
model's own likely text. The colluder needs nothing but the prompt and the answer's ids.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Any

import numpy as np


def _excluded(model: Any) -> frozenset[int]:
    """Ids never used as carriers: EOS (it would end the answer) and the tokenizer's specials."""
    out = set(int(t) for t in model.info.eos_token_ids)
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        from exfilguard.models.hf import load_tokenizer

        tok = load_tokenizer()
    out.update(int(t) for t in tok.all_special_ids)
    return frozenset(out)


def candidates(logits: np.ndarray, k: int, excluded: frozenset[int]) -> list[int]:
    """The 2**k most likely ids (ties by lower id), specials left out."""
    want = 1 << k
    row = np.asarray(logits, dtype=np.float32)
    top = np.argpartition(-row, want + len(excluded))[: want + len(excluded)]
    order = sorted((int(t) for t in top if int(t) not in excluded), key=lambda t: (-float(row[t]), t))
    return order[:want]


class StegoChooser:
    """Embeds / extracts k bits per token over `model`, continuing after `prompt_ids`."""

    def __init__(self, model: Any, prompt_ids: Sequence[int], bits_per_token: int = 1):
        if not 1 <= bits_per_token <= 8:
            raise ValueError("bits_per_token must be 1..8")
        self.model, self.k = model, bits_per_token
        self.session = model.session(list(prompt_ids))
        self.excluded = _excluded(model)

    def next_candidates(self) -> list[int]:
        return candidates(self.session.logits(), self.k, self.excluded)

    def feed(self, token: int) -> None:
        self.session.feed(int(token))

    def embed(self, bits: Sequence[int]) -> list[int]:
        """Token ids carrying `bits` (padded with zeros to a multiple of k)."""
        out = []
        for i in range(0, len(bits), self.k):
            chunk = list(bits[i : i + self.k]) + [0] * max(0, self.k - len(bits[i : i + self.k]))
            idx = int("".join(str(b) for b in chunk), 2)
            tok = self.next_candidates()[idx]
            out.append(tok)
            self.feed(tok)
        return out

    def extract_one(self, token: int) -> list[int] | None:
        """The k bits `token` carries at the current position (None if it is not a candidate); feeds it."""
        cands = self.next_candidates()
        self.feed(token)
        if token not in cands:
            return None
        return [int(c) for c in format(cands.index(token), f"0{self.k}b")]


def carrier(key: bytes, prompt_ids: Sequence[int], position: int, rate: float) -> bool:
    """Whether `position` of the answer to this prompt carries a bit (drip): a keyed hash both sides know."""
    h = hmac.new(key, repr((list(prompt_ids)[-32:], position)).encode(), hashlib.sha256).digest()
    return int.from_bytes(h[:8], "big") < int(rate * (1 << 64))


def bytes_to_bits(data: bytes) -> list[int]:
    return [(b >> (7 - i)) & 1 for b in data for i in range(8)]


def bits_to_bytes(bits: Sequence[int]) -> bytes:
    n = len(bits) // 8
    return bytes(int("".join(str(b) for b in bits[8 * i : 8 * i + 8]), 2) for i in range(n))
