"""Token ids <-> UTF-8 bytes for the SmolLM2 byte-level BPE (used by the zstd codecs)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte <-> printable-character map used by byte-level BPE vocabularies.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


class TokenText:
    """Maps ids to their exact bytes and re-tokenizes bytes; wraps the shipped tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        vocab = tokenizer.get_vocab()
        special = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()}
        table: dict[int, bytes] = {}
        for tok, i in vocab.items():
            if tok in special or any(ch not in byte_of for ch in tok):
                table[i] = tok.encode("utf-8")
            else:
                table[i] = bytes(byte_of[ch] for ch in tok)
        self._table = table
        self.vocab_size = max(table) + 1

    def to_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes the ids stand for; KeyError for an id outside the vocabulary."""
        return b"".join(self._table[int(i)] for i in ids)

    def to_ids(self, data: bytes) -> list[int] | None:
        """Re-tokenize; None if the bytes are not UTF-8 (they cannot be tokenized as text)."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return list(self.tokenizer.encode(text, add_special_tokens=False))


@lru_cache(maxsize=1)
def smollm2_text() -> TokenText:
    """TokenText for the SmolLM2 tokenizer shipped with exfilguard (loaded once)."""
    from exfilguard.models.hf import load_tokenizer

    return TokenText(load_tokenizer())
