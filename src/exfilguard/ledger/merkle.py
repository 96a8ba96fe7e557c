"""RFC 6962 Merkle tree hashing: pure functions over bytes, no storage.

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


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


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


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """Return the audit path for leaf `index` in the tree over `leaf_hashes` (RFC 6962 2.1.1)."""
    n = len(leaf_hashes)
    if not 0 <= index < n:
        raise IndexError("leaf index out of range")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return inclusion_proof(leaf_hashes[:k], index) + [root(leaf_hashes[k:])]
    return inclusion_proof(leaf_hashes[k:], index - k) + [root(leaf_hashes[:k])]


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], expected_root: bytes) -> bool:
    """Return True when `proof` shows `leaf` at `index` in the tree of `size` with `expected_root`."""
    if not 0 <= index < size or len(leaf) != HASH_SIZE or len(expected_root) != HASH_SIZE:
        return False
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if len(p) != HASH_SIZE or sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == expected_root


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """Return the proof that the tree of `old_size` leaves is a prefix of the whole tree (2.1.2)."""
    n = len(leaf_hashes)
    if not 0 <= old_size <= n:
        raise ValueError("old size out of range")
    if old_size in (0, n):
        return []
    return _subproof(old_size, leaf_hashes, True)


def _subproof(m: int, d: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if complete else [root(d)]
    k = _split(n)
    if m <= k:
        return _subproof(m, d[:k], complete) + [root(d[k:])]
    return _subproof(m - k, d[k:], False) + [root(d[:k])]


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> bool:
    """Return True when `proof` shows the tree (old_size, old_root) is a prefix of (new_size, new_root)."""
    if not 0 <= old_size <= new_size:
        return False
    # Every hash is 32 bytes: a malformed root or element is a failed proof, never an exception.
    if any(len(p) != HASH_SIZE for p in (old_root, new_root, *proof)):
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    path = list(proof)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    if fn == 0:  # the old tree is a perfect left subtree: its root starts both chains
        path = [old_root] + path
    if not path:
        return False
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root
