"""Checkpoints: a signed tree head plus every budget's cap and used bytes, for outside auditors.

A checkpoint file is canonical JSON ``{"version": 1, "head": HEAD, "budgets": [{"budget",
"cap_bytes", "used_bytes"}, ...], "signature": HEX}`` where HEAD is the signed tree head
``{"tree_size", "ts", "root", "key_id", "signature"}`` (``keys.TreeHead``, signature as in
``keys.sth_message``) and the checkpoint signature is Ed25519 by the same key over
``b"exfilguard-checkpoint-v1\\x00" || canonical JSON of {head, budgets, version}``.
A plain signed tree head file (HEAD alone) is accepted wherever a checkpoint is.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from exfilguard.errors import ConfigError, LedgerTampered
from exfilguard.ledger import merkle
from exfilguard.ledger.keys import TreeHead, key_id, sign_tree_head, verify_tree_head
from exfilguard.ledger.store import Ledger

CHECKPOINT_VERSION = 1
CHECKPOINT_DOMAIN = b"exfilguard-checkpoint-v1\x00"


@dataclass(frozen=True)
class Checkpoint:
    """A signed tree head and the budgets' totals at that head (``signature`` empty for a bare head)."""

    head: TreeHead
    budgets: list[dict[str, Any]] = field(default_factory=list)
    version: int = CHECKPOINT_VERSION
    signature: bytes = b""


def canonical_json(obj: Any) -> bytes:
    """Return the canonical encoding used for everything exfilguard signs (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def head_to_json(head: TreeHead) -> dict[str, Any]:
    """Return the agreed JSON form of a signed tree head."""
    return {"tree_size": head.tree_size, "ts": head.ts, "root": head.root.hex(), "key_id": head.key_id,
            "signature": head.signature.hex()}


def head_from_json(obj: Any, where: str = "tree head") -> TreeHead:
    """Parse the JSON form of a tree head or raise ConfigError naming what is wrong."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where} is not a JSON object")
    try:
        size, ts, root = obj["tree_size"], obj["ts"], bytes.fromhex(obj["root"])
        kid, sig = obj.get("key_id", ""), bytes.fromhex(obj.get("signature", ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where} is malformed ({type(exc).__name__}: {exc})") from None
    if not (all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64 for v in (size, ts))
            and len(root) == merkle.HASH_SIZE and isinstance(kid, str)):
        raise ConfigError(f"{where} is malformed (tree_size and ts as 64-bit counts, 32-byte root and key_id expected)")
    return TreeHead(size, ts, root, kid, sig)


def _signed_body(cp: Checkpoint) -> bytes:
    return CHECKPOINT_DOMAIN + canonical_json({"head": head_to_json(cp.head), "budgets": cp.budgets, "version": cp.version})


def make_checkpoint(ledger: Ledger, private_key: Ed25519PrivateKey) -> Checkpoint:
    """Sign the ledger's current head and every budget's totals as of exactly that head."""
    size, last_ts, root, rows = _snapshot(ledger)
    th = sign_tree_head(private_key, size, max(last_ts, int(time.time() * 1_000_000)), root)
    budgets = [{"budget": r[0], "cap_bytes": int(r[1]), "used_bytes": int(r[2])} for r in rows]
    cp = Checkpoint(th, budgets, CHECKPOINT_VERSION)
    return Checkpoint(th, budgets, CHECKPOINT_VERSION, private_key.sign(_signed_body(cp)))


def _snapshot(ledger: Ledger) -> tuple[int, int, bytes, list[tuple[Any, ...]]]:
    # Every write that changes a budget row appends an event in the same transaction, so
    # budgets read between two reads of an unchanged head belong to exactly that head. Reads
    # only: a frozen (read-only) ledger can still be checkpointed. Under steady traffic the
    # head may keep moving; then take the head lock for one short transaction.
    for _ in range(20):
        before = ledger.tree_head()
        rows = [(n, cap, reserved) for n, cap, reserved, _o, _w in ledger.budget_rows()]
        after = ledger.tree_head()
        if (before.tree_size, before.root) == (after.tree_size, after.root):
            return before.tree_size, before.ts, before.root, rows

    def locked(cur: Any, head: Any) -> tuple[int, int, bytes, list[tuple[Any, ...]]]:
        got = cur.execute(ledger._sql("SELECT name, cap_bytes, reserved_bytes FROM budgets ORDER BY name")).fetchall()
        return head.tree_size, head.last_ts, merkle.frontier_root(head.frontier), [tuple(r) for r in got]

    return ledger._write(locked)


def checkpoint_to_json(cp: Checkpoint) -> dict[str, Any]:
    """Return the file form of a checkpoint (a bare head when it carries no checkpoint signature)."""
    if not cp.signature:
        return head_to_json(cp.head)
    return {"version": cp.version, "head": head_to_json(cp.head), "budgets": cp.budgets, "signature": cp.signature.hex()}


def write_checkpoint(path: Path, cp: Checkpoint) -> None:
    """Write a checkpoint file (canonical JSON, then a newline) atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(canonical_json(checkpoint_to_json(cp)) + b"\n")
    os.replace(tmp, path)


def load_checkpoint(path: Path, public_keys: Sequence[Ed25519PublicKey] | None = None) -> Checkpoint:
    """Read a checkpoint or bare signed head; with `public_keys`, check its signatures.

    Raises ConfigError for a file that cannot be read or parsed and LedgerTampered for a
    signature that does not verify or a key that is not among `public_keys`.
    """
    try:
        obj = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"checkpoint {path} is not JSON: {exc}") from None
    if isinstance(obj, dict) and "head" in obj:
        head = head_from_json(obj["head"], f"head of checkpoint {path}")
        budgets, version = obj.get("budgets"), obj.get("version")
        try:
            sig = bytes.fromhex(obj.get("signature", ""))
        except (TypeError, ValueError):
            raise ConfigError(f"checkpoint {path} has a malformed signature") from None
        if version != CHECKPOINT_VERSION:
            raise ConfigError(f"checkpoint {path} has version {version!r}; this exfilguard reads {CHECKPOINT_VERSION}")
        if not isinstance(budgets, list) or not all(
            isinstance(b, dict) and isinstance(b.get("budget"), str) and isinstance(b.get("cap_bytes"), int)
            and isinstance(b.get("used_bytes"), int) for b in budgets
        ):
            raise ConfigError(f"checkpoint {path} has malformed budgets")
        cp = Checkpoint(head, budgets, version, sig)
    else:
        cp = Checkpoint(head_from_json(obj, f"signed tree head {path}"))
    if public_keys is not None:
        _check_signatures(cp, public_keys, path, is_checkpoint=isinstance(obj, dict) and "head" in obj)
    return cp


def _check_signatures(cp: Checkpoint, public_keys: Sequence[Ed25519PublicKey], path: Path, is_checkpoint: bool) -> None:
    keys = {key_id(k): k for k in public_keys}
    k = keys.get(cp.head.key_id)
    if k is None:
        raise LedgerTampered(
            f"{path} is signed by key {cp.head.key_id or '(none)'}, not by any given public key ({', '.join(keys) or 'none'})"
        )
    if not verify_tree_head(k, cp.head):
        raise LedgerTampered(f"{path}: the tree head's signature does not verify (head changed after signing)")
    if is_checkpoint:  # an unsigned or stripped checkpoint signature never passes as a bare head
        try:
            k.verify(cp.signature, _signed_body(cp))
        except InvalidSignature:
            raise LedgerTampered(f"{path}: the checkpoint signature does not verify (budgets or head changed after signing)") from None
