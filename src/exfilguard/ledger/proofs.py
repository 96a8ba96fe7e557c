"""Proof files for outside auditors: RFC 6962 consistency proofs between two checkpoints and
inclusion proofs of single entries (the entry's bytes travel with the proof).

Making a proof reads the ledger; checking one needs only the proof, the checkpoint(s) and the
meter's public key. A consistency proof file is canonical JSON
``{"type": "exfilguard-consistency-proof-v1", "old_size", "old_root", "new_size", "new_root", "proof": [HEX]}``;
an inclusion proof file is
``{"type": "exfilguard-inclusion-proof-v1", "seq", "tree_size", "root", "entry": ASCII, "proof": [HEX]}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exfilguard.errors import ConfigError, LedgerTampered
from exfilguard.ledger import merkle, merkle_proofs
from exfilguard.ledger import reads
from exfilguard.ledger.checkpoint import Checkpoint, canonical_json
from exfilguard.ledger.events import decode_event
from exfilguard.ledger.keys import TreeHead
from exfilguard.ledger.store import Ledger

CONSISTENCY_TYPE = "exfilguard-consistency-proof-v1"
INCLUSION_TYPE = "exfilguard-inclusion-proof-v1"


@dataclass(frozen=True)
class ConsistencyProof:
    """Shows the tree (old_size, old_root) is a prefix of the tree (new_size, new_root)."""

    old_size: int
    old_root: bytes
    new_size: int
    new_root: bytes
    path: list[bytes]


@dataclass(frozen=True)
class InclusionProof:
    """Shows `entry` is leaf `seq` of the tree (tree_size, root)."""

    seq: int
    tree_size: int
    root: bytes
    entry: bytes
    path: list[bytes]


def _leaf_hashes(ledger: Ledger, size: int) -> list[bytes]:
    leaves: list[bytes] = []
    for seq, entry in reads.entries(ledger):
        if seq != len(leaves):
            raise LedgerTampered(f"ledger {ledger.url} has a gap at entry {len(leaves)} (entries deleted or renumbered)")
        if seq >= size:
            break
        leaves.append(merkle.leaf_hash(entry))
    if len(leaves) < size:
        raise LedgerTampered(f"ledger {ledger.url} holds {len(leaves)} entries but a checkpoint covers {size}: entries were deleted")
    return leaves


def _check_head(leaves: list[bytes], head: TreeHead, what: str) -> None:
    if merkle.root(leaves[: head.tree_size]) != head.root:
        raise LedgerTampered(
            f"the ledger's first {head.tree_size} entries do not hash to the {what} checkpoint's root: "
            "its history was rewritten (or the checkpoint is from another ledger)"
        )


def prove_consistency(ledger: Ledger, old: TreeHead, new: TreeHead) -> ConsistencyProof:
    """Return the consistency proof from `old` to `new`; LedgerTampered if the ledger matches neither."""
    if old.tree_size > new.tree_size:
        raise ConfigError(f"the old checkpoint ({old.tree_size} entries) is larger than the new one ({new.tree_size}); swap them")
    leaves = _leaf_hashes(ledger, new.tree_size)
    _check_head(leaves, old, "old")
    _check_head(leaves, new, "new")
    return ConsistencyProof(old.tree_size, old.root, new.tree_size, new.root, merkle_proofs.consistency_proof(leaves, old.tree_size))


def prove_inclusion(ledger: Ledger, seq: int, head: TreeHead) -> InclusionProof:
    """Return the inclusion proof of entry `seq` in the tree of `head`, with the entry's bytes."""
    if not 0 <= seq < head.tree_size:
        raise ConfigError(f"entry {seq} is not in a checkpoint of {head.tree_size} entries (0..{head.tree_size - 1})")
    leaves = _leaf_hashes(ledger, head.tree_size)
    _check_head(leaves, head, "given")
    entry = next(e for s, e in reads.entries(ledger, seq) if s == seq)
    if merkle.leaf_hash(entry) != leaves[seq]:
        raise LedgerTampered(f"entry {seq} changed while the proof was made")
    return InclusionProof(seq, head.tree_size, head.root, entry, merkle_proofs.inclusion_proof(leaves, seq))


def proof_to_json(proof: ConsistencyProof | InclusionProof) -> dict[str, Any]:
    """Return the file form of a proof."""
    if isinstance(proof, ConsistencyProof):
        return {"type": CONSISTENCY_TYPE, "old_size": proof.old_size, "old_root": proof.old_root.hex(),
                "new_size": proof.new_size, "new_root": proof.new_root.hex(), "proof": [p.hex() for p in proof.path]}
    return {"type": INCLUSION_TYPE, "seq": proof.seq, "tree_size": proof.tree_size, "root": proof.root.hex(),
            "entry": proof.entry.decode("ascii"), "proof": [p.hex() for p in proof.path]}


def write_proof(path: Path, proof: ConsistencyProof | InclusionProof) -> None:
    """Write a proof file (canonical JSON) atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(canonical_json(proof_to_json(proof)) + b"\n")
    os.replace(tmp, path)


def _int(obj: dict[str, Any], key: str) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{key} is not a non-negative integer")
    return v


def _hash(text: Any, key: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{key} is not a hex string")
    b = bytes.fromhex(text)
    if len(b) != merkle.HASH_SIZE:
        raise ValueError(f"{key} is not a 32-byte hash")
    return b


def load_proof(path: Path) -> ConsistencyProof | InclusionProof:
    """Read a proof file or raise ConfigError naming what is wrong with it."""
    try:
        obj = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read proof {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"proof {path} is not JSON: {exc}") from None
    try:
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        raw = obj.get("proof")
        if not isinstance(raw, list):
            raise ValueError("proof is not a list")
        path_hashes = [_hash(p, "a proof element") for p in raw]
        if obj.get("type") == CONSISTENCY_TYPE:
            return ConsistencyProof(_int(obj, "old_size"), _hash(obj.get("old_root"), "old_root"),
                                    _int(obj, "new_size"), _hash(obj.get("new_root"), "new_root"), path_hashes)
        if obj.get("type") == INCLUSION_TYPE:
            entry = obj.get("entry")
            if not isinstance(entry, str):
                raise ValueError("entry is not a string")
            return InclusionProof(_int(obj, "seq"), _int(obj, "tree_size"), _hash(obj.get("root"), "root"),
                                  entry.encode("ascii"), path_hashes)
        raise ValueError(f"unknown proof type {obj.get('type')!r}")
    except (ValueError, UnicodeEncodeError) as exc:
        raise ConfigError(f"proof {path} is malformed: {exc}") from None


def check_consistency(old: Checkpoint, new: Checkpoint, proof: ConsistencyProof) -> None:
    """Check offline that `new`'s log extends `old`'s; raise LedgerTampered if not.

    The checkpoints' signatures are checked when they are loaded (``load_checkpoint``).
    """
    if (proof.old_size, proof.old_root) != (old.head.tree_size, old.head.root):
        raise LedgerTampered(f"the proof starts from tree size {proof.old_size}, not from the old checkpoint "
                             f"({old.head.tree_size} entries, root {old.head.root.hex()})")
    if (proof.new_size, proof.new_root) != (new.head.tree_size, new.head.root):
        raise LedgerTampered(f"the proof ends at tree size {proof.new_size}, not at the new checkpoint "
                             f"({new.head.tree_size} entries, root {new.head.root.hex()})")
    if old.head.tree_size > new.head.tree_size:
        raise LedgerTampered(f"the old checkpoint has more entries ({old.head.tree_size}) than the new one "
                             f"({new.head.tree_size}): the log shrank (or swap --old and --new)")
    if not merkle_proofs.verify_consistency(old.head.tree_size, new.head.tree_size, old.head.root, new.head.root, proof.path):
        raise LedgerTampered(
            f"the log of {new.head.tree_size} entries is NOT an extension of the log of {old.head.tree_size} entries: "
            "history was rewritten or forked (or the proof was changed)"
        )


def check_inclusion(checkpoint: Checkpoint, proof: InclusionProof) -> dict[str, Any]:
    """Check offline that the proof's entry is in `checkpoint`'s log; return the decoded event."""
    if (proof.tree_size, proof.root) != (checkpoint.head.tree_size, checkpoint.head.root):
        raise LedgerTampered(f"the proof is for a tree of {proof.tree_size} entries, not the checkpoint's "
                             f"({checkpoint.head.tree_size} entries, root {checkpoint.head.root.hex()})")
    if not merkle_proofs.verify_inclusion(merkle.leaf_hash(proof.entry), proof.seq, proof.tree_size, proof.path, proof.root):
        raise LedgerTampered(f"entry {proof.seq} as given is NOT in the checkpoint's log (entry or proof changed)")
    try:
        event = decode_event(proof.entry)
    except ValueError as exc:
        raise LedgerTampered(f"entry {proof.seq} is in the log but is not a valid ledger entry: {exc}") from None
    if event["seq"] != proof.seq:
        raise LedgerTampered(f"entry at position {proof.seq} carries seq {event['seq']}")
    return event
