"""Key pairs and signature checks for the CLI and auditors: new Ed25519 key pairs, public keys, signed heads checked.

The meter only signs (keys.py); it imports nothing from here.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from exfilguard.errors import ConfigError
from exfilguard.ledger.keys import TreeHead, sth_message


def generate_keypair(out: Path) -> tuple[Path, Path]:
    """Write a new Ed25519 private key to `out` (mode 0600, PEM) and its public key to `out`.pub."""
    out = Path(out)
    pub_path = out.with_name(out.name + ".pub")
    if out.exists():
        raise ConfigError(f"{out} already exists; refusing to overwrite a key (remove it first)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return out, pub_path


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key (PEM) or raise ConfigError saying what is wrong."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read public key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key


def verify_tree_head(public: Ed25519PublicKey, head: TreeHead) -> bool:
    """Return True when `head` carries a valid signature by `public`."""
    try:
        public.verify(head.signature, sth_message(head.tree_size, head.ts, head.root))
    except InvalidSignature:
        return False
    return True
