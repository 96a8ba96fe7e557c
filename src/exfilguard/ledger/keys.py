"""Ed25519 signed tree heads (STH): what the meter signs, and the signing key it loads.

The signed message of a tree head is ``b"exfilguard-sth-v1\\x00" || tree_size (8 bytes,
big-endian) || timestamp in microseconds (8 bytes, big-endian) || root (32 bytes)``.
A key id is the first 16 hex digits of SHA-256 of the raw 32-byte public key. A published
head is the JSON ``{"tree_size", "ts", "root" (hex), "key_id", "signature" (hex)}``.
Making key pairs, loading public keys and checking signatures (the CLI's and the auditor's side)
are in keytools.py, which the meter does not import.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from exfilguard.base_errors import ConfigError

STH_DOMAIN = b"exfilguard-sth-v1\x00"


@dataclass(frozen=True)
class TreeHead:
    """A tree head, signed or not: the log had `tree_size` entries with this `root` at `ts`."""

    tree_size: int
    ts: int
    root: bytes
    key_id: str = ""
    signature: bytes = b""


def sth_message(tree_size: int, ts: int, root: bytes) -> bytes:
    """Return the bytes a tree head's signature covers."""
    return STH_DOMAIN + struct.pack(">QQ", tree_size, ts) + root


def key_id(public: Ed25519PublicKey) -> str:
    """Return the short id of a public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PEM) or raise ConfigError saying what is wrong."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read signing key {path}: {exc.strerror}; make one with `exfilguard keys new --out {path}`") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return key


def sign_tree_head(key: Ed25519PrivateKey, tree_size: int, ts: int, root: bytes) -> TreeHead:
    """Return the tree head signed with `key`."""
    sig = key.sign(sth_message(tree_size, ts, root))
    return TreeHead(tree_size, ts, root, key_id(key.public_key()), sig)


def head_to_json(head: TreeHead) -> dict[str, Any]:
    """The published form of a signed tree head."""
    return {"tree_size": head.tree_size, "ts": head.ts, "root": head.root.hex(), "key_id": head.key_id,
            "signature": head.signature.hex()}


def head_from_json(obj: Any, where: str = "head") -> TreeHead:
    """Parse a published head; raise ConfigError naming what is malformed."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where} is not a JSON object")
    try:
        size, ts, root, kid, sig = obj["tree_size"], obj["ts"], obj["root"], obj["key_id"], obj["signature"]
    except KeyError as exc:
        raise ConfigError(f"{where} lacks {exc.args[0]!r}") from None
    if not (isinstance(size, int) and size >= 0 and isinstance(ts, int) and ts >= 0):
        raise ConfigError(f"{where}: tree_size and ts must be non-negative integers")
    if not (isinstance(root, str) and re.fullmatch(r"[0-9a-f]{64}", root)):
        raise ConfigError(f"{where}: root must be 64 lowercase hex digits")
    if not (isinstance(kid, str) and re.fullmatch(r"[0-9a-f]{16}", kid)):
        raise ConfigError(f"{where}: key_id must be 16 lowercase hex digits")
    if not (isinstance(sig, str) and re.fullmatch(r"(?:[0-9a-f]{2})+", sig)):
        raise ConfigError(f"{where}: signature must be hex")
    return TreeHead(size, ts, bytes.fromhex(root), kid, bytes.fromhex(sig))
