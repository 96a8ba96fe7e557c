"""RFC 6962 Merkle hashing against the published Certificate Transparency test vectors."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from exfilguard.ledger import merkle, merkle_proofs

# RFC 6962 reference leaves and the root for each tree size 0..8, as published with the
# Certificate Transparency reference implementation (and transparency-dev/merkle testonly).
LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
)]
ROOTS = [bytes.fromhex(h) for h in (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]
CONSISTENCY = [
    (2, 8, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
HASHES = [merkle.leaf_hash(e) for e in LEAVES]


def test_leaf_and_node_prefixes():
    assert merkle.leaf_hash(b"") == ROOTS[1]
    assert merkle.leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    a, b = HASHES[0], HASHES[1]
    assert merkle.node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest() == ROOTS[2]


def test_roots_match_rfc6962_vectors():
    for n in range(len(LEAVES) + 1):
        assert merkle.root(HASHES[:n]) == ROOTS[n], n


def test_frontier_matches_vectors():
    frontier: list[bytes] = []
    assert merkle.frontier_root(frontier) == ROOTS[0]
    for i, h in enumerate(HASHES):
        frontier = merkle.frontier_append(frontier, i, h)
        assert merkle.frontier_root(frontier) == ROOTS[i + 1]


def test_inclusion_vectors():
    for index, size, proof in INCLUSION:
        want = [bytes.fromhex(p) for p in proof]
        assert merkle_proofs.inclusion_proof(HASHES[:size], index) == want
        assert merkle_proofs.verify_inclusion(HASHES[index], index, size, want, ROOTS[size])
        assert not merkle_proofs.verify_inclusion(HASHES[index], index ^ 1, size, want, ROOTS[size])


def test_consistency_vectors():
    for old, new, proof in CONSISTENCY:
        want = [bytes.fromhex(p) for p in proof]
        assert merkle_proofs.consistency_proof(HASHES[:new], old) == want
        assert merkle_proofs.verify_consistency(old, new, ROOTS[old], ROOTS[new], want)
        assert not merkle_proofs.verify_consistency(old, new, ROOTS[old - 1], ROOTS[new], want)


def test_every_proof_in_small_trees():
    leaves = [merkle.leaf_hash(bytes([i, i * 7 % 256])) for i in range(33)]
    roots = [merkle.root(leaves[:n]) for n in range(34)]
    for n in range(1, 34):
        for i in range(n):
            p = merkle_proofs.inclusion_proof(leaves[:n], i)
            assert merkle_proofs.verify_inclusion(leaves[i], i, n, p, roots[n])
            if p:
                bad = list(p)
                bad[-1] = bytes(32)
                assert not merkle_proofs.verify_inclusion(leaves[i], i, n, bad, roots[n])
                assert not merkle_proofs.verify_inclusion(leaves[i], i, n, p[:-1], roots[n])
        for m in range(n + 1):
            p = merkle_proofs.consistency_proof(leaves[:n], m)
            assert merkle_proofs.verify_consistency(m, n, roots[m], roots[n], p)
            if p:
                assert not merkle_proofs.verify_consistency(m, n, roots[m], roots[n], p[:-1])
                assert not merkle_proofs.verify_consistency(m, n, roots[m], roots[n], p + [bytes(32)])


def _recursive_mth(d: list[bytes]) -> bytes:
    """The RFC's own recursive definition, as a reference."""
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = 1
    while k * 2 < len(d):
        k *= 2
    return hashlib.sha256(b"\x01" + _recursive_mth(d[:k]) + _recursive_mth(d[k:])).digest()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=12), max_size=70))
def test_root_equals_recursive_definition(entries):
    assert merkle.root([merkle.leaf_hash(e) for e in entries]) == _recursive_mth(entries)
