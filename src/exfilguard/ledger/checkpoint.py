"""Signed tree heads and checkpoints kept outside the ledger: what a rollback cannot undo.

A published head is the JSON of a ``TreeHead``::

    {"tree_size": int, "ts": int (µs), "root": "<64 hex>", "key_id": "<16 hex>", "signature": "<hex>"}

with the signature of ``keys.sth_message``. A checkpoint adds the budgets the log adds up to at
that head, signed again as a whole::

    {"version": 1, "head": <head JSON>, "budgets": [{"budget", "cap_bytes", "used_bytes"}, ...],
     "signature": "<hex Ed25519 over b'exfilguard-checkpoint-v1\\x00' + canonical JSON of
                   {head, budgets, version}>"}

``load_checkpoint`` reads both forms (and a directory of them, as the meter's
``--publish-heads DIR`` writes). Canonical JSON is ``json.dumps(obj, sort_keys=True,
separators=(",", ":"), ensure_ascii=True)``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from exfilguard.errors import ConfigError, LedgerTampered
from exfilguard.ledger.events import canonical
from exfilguard.ledger.keys import TreeHead, head_from_json, head_to_json, key_id, sign_tree_head
from exfilguard.ledger.keytools import verify_tree_head

CHECKPOINT_DOMAIN = b"exfilguard-checkpoint-v1\x00"
CHECKPOINT_VERSION = 1


@dataclass
class Checkpoint:
    """A signed tree head and the budgets the log adds up to at it (empty for a plain head)."""

    head: TreeHead
    budgets: list[dict[str, Any]] = field(default_factory=list)
    version: int = CHECKPOINT_VERSION
    signature: bytes = b""

    def as_json(self) -> dict[str, Any]:
        return {"version": self.version, "head": head_to_json(self.head), "budgets": self.budgets,
                "signature": self.signature.hex()}


# The name the audit and approvals code uses.
canonical_json = canonical


def checkpoint_to_json(cp: Checkpoint) -> dict[str, Any]:
    """The file form of a checkpoint: a bare published head when it carries no checkpoint signature."""
    return cp.as_json() if cp.signature else head_to_json(cp.head)


def _signed_part(cp: Checkpoint) -> bytes:
    return CHECKPOINT_DOMAIN + canonical({"head": head_to_json(cp.head), "budgets": cp.budgets, "version": cp.version})


def make_checkpoint(ledger: Any, private_key: Ed25519PrivateKey) -> Checkpoint:
    """Audit the ledger (chain, root, accounting), sign its current head and budgets; LedgerTampered if it does not verify.

    Signed heads already in the ledger are not checked here (they may be by other keys);
    ``ledger verify`` does that.
    """
    from exfilguard.ledger.verify import verify_ledger

    rep = verify_ledger(ledger, (), check_heads=False)
    if not rep.ok:
        raise LedgerTampered(f"refusing to checkpoint a ledger that does not verify: {rep.problems[0]}")
    assert rep.state is not None
    head = sign_tree_head(private_key, rep.tree_size, max(rep.last_ts, int(time.time() * 1_000_000)), bytes.fromhex(rep.root))
    budgets = [{"budget": name, "cap_bytes": b.cap, "used_bytes": b.reserved} for name, b in sorted(rep.state.budgets.items())]
    cp = Checkpoint(head, budgets)
    cp.signature = private_key.sign(_signed_part(cp))
    return cp


def write_checkpoint(path: str | os.PathLike[str], cp: Checkpoint) -> None:
    """Write a checkpoint as one canonical JSON line; refuse to overwrite an existing file."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise ConfigError(f"{p} already exists; a checkpoint is never overwritten (choose a new name)") from None
    except OSError as exc:
        raise ConfigError(f"cannot write checkpoint {p}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(canonical(checkpoint_to_json(cp)) + b"\n")
        f.flush()
        os.fsync(f.fileno())


def parse_checkpoint(obj: Any, public_keys: Sequence[Ed25519PublicKey] | None, where: str) -> Checkpoint:
    """Parse a checkpoint or plain head object; with keys, check every signature (LedgerTampered)."""
    if isinstance(obj, dict) and "head" in obj:
        if obj.get("version") != CHECKPOINT_VERSION:
            raise ConfigError(f"{where}: unknown checkpoint version {obj.get('version')!r}")
        budgets = obj.get("budgets")
        if not isinstance(budgets, list) or not all(
            isinstance(b, dict) and isinstance(b.get("budget"), str) and isinstance(b.get("cap_bytes"), int)
            and isinstance(b.get("used_bytes"), int) for b in budgets
        ):
            raise ConfigError(f"{where}: budgets must be a list of {{budget, cap_bytes, used_bytes}}")
        sig = obj.get("signature")
        if sig == "":
            raise LedgerTampered(f"{where}: the checkpoint's signature is missing (stripped)")
        if not (isinstance(sig, str) and re.fullmatch(r"(?:[0-9a-f]{2})+", sig)):
            raise ConfigError(f"{where}: signature must be hex")
        cp = Checkpoint(head_from_json(obj["head"], f"{where} head"), budgets, CHECKPOINT_VERSION, bytes.fromhex(sig))
    else:
        cp = Checkpoint(head_from_json(obj, where))
    if public_keys is not None:
        keys = {key_id(k): k for k in public_keys}
        k = keys.get(cp.head.key_id)
        if k is None:
            raise LedgerTampered(f"{where} is signed by key {cp.head.key_id}, which is none of the --public-key keys")
        if not verify_tree_head(k, cp.head):
            raise LedgerTampered(f"{where}: the tree head's signature does not verify (changed)")
        if cp.signature:
            try:
                k.verify(cp.signature, _signed_part(cp))
            except InvalidSignature:
                raise LedgerTampered(f"{where}: the checkpoint's signature does not verify (changed)") from None
    return cp


def load_checkpoint(path: str | os.PathLike[str], public_keys: Sequence[Ed25519PublicKey] | None = None) -> Checkpoint:
    """Read a checkpoint or a published head from `path`; with keys, check its signatures.

    Raises ConfigError when the file is missing or malformed, LedgerTampered when a signature
    does not verify or is by none of the keys.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read trusted head {p}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"trusted head {p} is not JSON: {exc}") from None
    return parse_checkpoint(obj, public_keys, f"trusted head {p}")


def load_trusted_heads(paths: Sequence[str | os.PathLike[str]], public_keys: Sequence[Ed25519PublicKey] | None) -> list[Checkpoint]:
    """Load each path: a checkpoint or head file, or a directory of ``*.json`` heads (``--publish-heads DIR``)."""
    out: list[Checkpoint] = []
    for path in paths:
        p = Path(path)
        if p.is_dir():
            files = sorted(p.glob("*.json"))
            if not files:
                raise ConfigError(f"trusted head directory {p} holds no *.json heads")
            out.extend(load_checkpoint(f, public_keys) for f in files)
        else:
            out.append(load_checkpoint(p, public_keys))
    return out


__all__ = [
    "Checkpoint",
    "canonical",
    "canonical_json",
    "checkpoint_to_json",
    "head_from_json",
    "head_to_json",
    "load_checkpoint",
    "load_trusted_heads",
    "make_checkpoint",
    "parse_checkpoint",
    "write_checkpoint",
]
