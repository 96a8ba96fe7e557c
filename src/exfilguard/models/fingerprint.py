"""Fingerprints: SHA-256 over weights, tokenizer and the inference settings that change bits."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def tokenizer_digest(vocab: Mapping[str, int], special: Iterable[int] = ()) -> bytes:
    """SHA-256 of a tokenizer's vocabulary (token string -> id) and special ids, order-free."""
    h = hashlib.sha256()
    items = sorted(vocab.items(), key=lambda kv: kv[1])
    h.update(json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode())
    h.update(json.dumps(sorted(int(i) for i in special)).encode())
    return h.digest()


def fingerprint(
    arrays: Mapping[str, np.ndarray],
    tokenizer: bytes,
    settings: Mapping[str, Any],
) -> str:
    """Hex SHA-256 over named arrays (sorted by name; dtype, shape and bytes, little-endian),
    the tokenizer digest and a JSON of settings. Stable across processes and machines."""
    h = hashlib.sha256(b"exfilguard-model-v1\x00")
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
            a = a.astype(a.dtype.newbyteorder("<"))
        h.update(name.encode() + b"\x00" + a.dtype.str.encode() + b"\x00")
        h.update(json.dumps(list(a.shape)).encode())
        h.update(memoryview(a).cast("B"))
    h.update(tokenizer)
    h.update(json.dumps(dict(settings), sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()
