"""RFC 6962 Merkle tree hashing: pure functions over bytes, no storage (the proofs are in merkle_proofs.py).

leaf hash = SHA-256(0x00 || entry), node hash = SHA-256(0x01 || left || right); the tree over n
leaves splits at k, the largest power of two smaller than n (RFC 6962 section 2.1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(entry: bytes) -> bytes:
    """Return the RFC 6962 hash of one log entry."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 6962 hash of an interior node."""
    if len(left) != HASH_SIZE or len(right) != HASH_SIZE:
        raise ValueError("node_hash takes two 32-byte hashes")
    return hashlib.sha256(b"\x01" + left + right).digest()


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """Return the Merkle tree hash of the given leaf hashes (MTH in RFC 6962)."""
    n = len(leaf_hashes)
    if n == 0:
        return EMPTY_ROOT
    # Bottom-up over the compact frontier: same result as the recursive definition, O(n).
    frontier: list[bytes] = []
    for i, h in enumerate(leaf_hashes):
        frontier = frontier_append(frontier, i, h)
    return frontier_root(frontier)


def frontier_append(frontier: Sequence[bytes], size: int, leaf: bytes) -> list[bytes]:
    """Add one leaf hash to a tree of `size` leaves given by its frontier; return the new frontier.

    The frontier is the list of roots of the perfect subtrees that make up the tree, largest
    (leftmost) first: one per set bit of `size`. It lets a log keep its root in O(log n) space.
    """
    if len(frontier) != bin(size).count("1"):
        raise ValueError("frontier does not match tree size")
    out = list(frontier)
    h = leaf
    s = size
    while s & 1:
        h = node_hash(out.pop(), h)
        s >>= 1
    out.append(h)
    return out


def frontier_root(frontier: Sequence[bytes]) -> bytes:
    """Return the tree hash of the tree whose frontier is given."""
    if not frontier:
        return EMPTY_ROOT
    h = frontier[-1]
    for left in reversed(frontier[:-1]):
        h = node_hash(left, h)
    return h
