"""RFC 6962 / RFC 9162 inclusion and consistency proofs: published vectors, their corruptions,
a brute-force reference built from the RFC's own definitions, and property tests."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from exfilguard.ledger import merkle, merkle_proofs

# Test vectors from transparency-dev/merkle, proof/verify_test.go (the same tables drive its
# cmd/proofgen/main.go, which writes testdata/inclusion and testdata/consistency): the 8-leaf
# RFC 6962 reference tree of the Certificate Transparency reference implementation. Leaf
# indices there are 1-based; below they are 0-based (index = leafIdx - 1).
LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f",
)]
ROOTS = [bytes.fromhex(h) for h in (  # root of the first n leaves, n = 1..8
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
EMPTY = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")
INCLUSION = [  # (leafIdx 1-based, size, proof)
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (2, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
CONSISTENCY = [  # (size1, size2, proof)
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]
HASHES = [merkle.leaf_hash(e) for e in LEAVES]


def _h(proof: list[str]) -> list[bytes]:
    return [bytes.fromhex(p) for p in proof]


def _flip(proof: list[bytes], i: int, mask: int) -> list[bytes]:
    out = list(proof)
    out[i] = bytes([out[i][0] ^ mask]) + out[i][1:]
    return out


def test_vector_roots():
    assert merkle.root([]) == EMPTY
    for n in range(1, 9):
        assert merkle.root(HASHES[:n]) == ROOTS[n - 1]


def test_inclusion_vectors_generate_and_verify():
    for leaf_idx, size, proof in INCLUSION:
        i, want = leaf_idx - 1, _h(proof)
        assert merkle_proofs.inclusion_proof(HASHES[:size], i) == want, (leaf_idx, size)
        assert merkle_proofs.verify_inclusion(HASHES[i], i, size, want, ROOTS[size - 1])


def test_consistency_vectors_generate_and_verify():
    for size1, size2, proof in CONSISTENCY:
        want = _h(proof)
        assert merkle_proofs.consistency_proof(HASHES[:size2], size1) == want, (size1, size2)
        assert merkle_proofs.verify_consistency(size1, size2, ROOTS[size1 - 1], ROOTS[size2 - 1], want)


def _bad_inclusion_probes(i: int, size: int, proof: list[bytes], root: bytes, leaf: bytes):
    """The corruptions transparency-dev/merkle's proofgen writes for every inclusion vector."""
    yield "leafIdx sub 1", i - 1, size, root, leaf, proof
    yield "leafIdx plus 1", i + 1, size, root, leaf, proof
    yield "leafIdx xor 2", i ^ 2, size, root, leaf, proof
    yield "treeSize mul 2", i, size * 2, root, leaf, proof
    yield "treeSize div 2", i, size // 2, root, leaf, proof
    yield "wrong leaf", i, size, root, b"WrongLeaf", proof
    yield "empty root", i, size, EMPTY, leaf, proof
    yield "random root", i, size, SOME_HASH, leaf, proof
    yield "trailing garbage", i, size, root, leaf, proof + [b""]
    yield "trailing root", i, size, root, leaf, proof + [root]
    yield "preceding garbage", i, size, root, leaf, [b""] + proof
    yield "preceding root", i, size, root, leaf, [root] + proof
    for k in range(len(proof)):
        yield f"modified proof[{k}] bit 3", i, size, root, leaf, _flip(proof, k, 8)
    if proof:
        yield "removed component", i, size, root, leaf, proof[:-1]
    if len(proof) > 1:
        yield "inserted component", i, size, root, leaf, [proof[0], SOME_HASH] + proof[1:]


def test_inclusion_vector_corruptions_all_fail():
    n = 0
    for leaf_idx, size, proof in INCLUSION:
        i = leaf_idx - 1
        for desc, pi, psize, proot, pleaf, pproof in _bad_inclusion_probes(i, size, _h(proof), ROOTS[size - 1], HASHES[i]):
            assert not merkle_proofs.verify_inclusion(pleaf, pi, psize, pproof, proot), (leaf_idx, size, desc)
            n += 1
    assert n > 60


def test_inclusion_static_probes_fail():
    # proofgen's "additional" and "single-entry" probes
    for index, size in [(0, 0), (0, 1), (1, 0), (2, 1)]:
        assert not merkle_proofs.verify_inclusion(SOME_HASH, index, size, [], b"")
        assert not merkle_proofs.verify_inclusion(b"", index, size, [], EMPTY)
        assert not merkle_proofs.verify_inclusion(SOME_HASH, index, size, [], EMPTY)
    h = merkle.leaf_hash(b"data")
    assert merkle_proofs.verify_inclusion(h, 0, 1, [], h)
    assert not merkle_proofs.verify_inclusion(b"", 0, 1, [], h)
    assert not merkle_proofs.verify_inclusion(h, 0, 1, [], b"")


def _bad_consistency_probes(s1: int, s2: int, r1: bytes, r2: bytes, proof: list[bytes]):
    """The corruptions transparency-dev/merkle's proofgen writes for every consistency vector."""
    yield "size1 sub 1", s1 - 1, s2, r1, r2, proof
    yield "size1 plus 1", s1 + 1, s2, r1, r2, proof
    yield "size1 xor 2", s1 ^ 2, s2, r1, r2, proof
    yield "size2 mul 2", s1, s2 * 2, r1, r2, proof
    yield "size2 div 2", s1, s2 // 2, r1, r2, proof
    yield "wrong root1", s1, s2, b"WrongRoot", r2, proof
    yield "wrong root2", s1, s2, r1, b"WrongRoot", proof
    yield "swapped roots", s1, s2, r2, r1, proof
    yield "empty proof", s1, s2, r1, r2, []
    yield "trailing garbage", s1, s2, r1, r2, proof + [b""]
    yield "trailing root1", s1, s2, r1, r2, proof + [r1]
    yield "trailing root2", s1, s2, r1, r2, proof + [r2]
    yield "preceding garbage", s1, s2, r1, r2, [b""] + proof
    yield "preceding root1", s1, s2, r1, r2, [r1] + proof
    yield "preceding root2", s1, s2, r1, r2, [r2] + proof
    yield "preceding proof 0", s1, s2, r1, r2, [proof[0]] + proof
    yield "truncated proof", s1, s2, r1, r2, proof[:-1]
    for k in range(len(proof)):
        yield f"modified proof[{k}] bit 4", s1, s2, r1, r2, _flip(proof, k, 16)


def test_consistency_vector_corruptions_all_fail():
    n = 0
    for s1, s2, proof in CONSISTENCY:
        if not proof:  # proofgen corrupts only the non-trivial proofs
            continue
        for desc, a, b, r1, r2, p in _bad_consistency_probes(s1, s2, ROOTS[s1 - 1], ROOTS[s2 - 1], _h(proof)):
            assert not merkle_proofs.verify_consistency(a, b, r1, r2, p), (s1, s2, desc)
            n += 1
    assert n > 70


def test_consistency_static_probes():
    r1, r2 = b"don't care 1", b"don't care 2"
    assert not merkle_proofs.verify_consistency(0, 0, r1, r2, [])  # sizes equal, roots not
    assert not merkle_proofs.verify_consistency(1, 1, r1, r2, [])
    assert not merkle_proofs.verify_consistency(1, 0, r1, r2, [])  # time travel
    assert not merkle_proofs.verify_consistency(2, 1, r1, r2, [])
    assert not merkle_proofs.verify_consistency(1, 2, r1, r2, [])  # empty proof
    assert not merkle_proofs.verify_consistency(0, 0, EMPTY, r2, [])
    assert not merkle_proofs.verify_consistency(1, 1, EMPTY, r2, [])
    assert not merkle_proofs.verify_consistency(0, 0, EMPTY, EMPTY, [EMPTY])  # sizes match, proof not empty
    assert not merkle_proofs.verify_consistency(1, 1, EMPTY, EMPTY, [EMPTY])
    assert not merkle_proofs.verify_consistency(0, 1, EMPTY, EMPTY, [EMPTY])
    assert merkle_proofs.verify_consistency(1, 1, ROOTS[0], ROOTS[0], [])


# -- brute-force reference: the RFC 6962 section 2.1 definitions, recursively, nothing shared --
def _ref_mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = 1
    while k * 2 < len(d):
        k *= 2
    return hashlib.sha256(b"\x01" + _ref_mth(d[:k]) + _ref_mth(d[k:])).digest()


def _ref_path(m: int, d: list[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return _ref_path(m, d[:k]) + [_ref_mth(d[k:])]
    return _ref_path(m - k, d[k:]) + [_ref_mth(d[:k])]


def _ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [_ref_mth(d)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return _ref_subproof(m, d[:k], b) + [_ref_mth(d[k:])]
    return _ref_subproof(m - k, d[k:], False) + [_ref_mth(d[:k])]


def _ref_proof(m: int, d: list[bytes]) -> list[bytes]:
    return [] if m in (0, len(d)) else _ref_subproof(m, d, True)


def test_every_proof_up_to_20_leaves_matches_the_reference():
    entries = [bytes([i]) * (i % 5) for i in range(20)]
    hashes = [merkle.leaf_hash(e) for e in entries]
    for n in range(1, 21):
        assert merkle.root(hashes[:n]) == _ref_mth(entries[:n])
        for i in range(n):
            assert merkle_proofs.inclusion_proof(hashes[:n], i) == _ref_path(i, entries[:n]), (i, n)
        for m in range(n + 1):
            assert merkle_proofs.consistency_proof(hashes[:n], m) == _ref_proof(m, entries[:n]), (m, n)


# -- properties --------------------------------------------------------------------------
@st.composite
def _tree_mi(draw):
    n = draw(st.integers(1, 300))
    m = draw(st.integers(0, n))
    i = draw(st.integers(0, n - 1))
    seed = draw(st.binary(min_size=1, max_size=8))
    return n, m, i, seed


def _leaves(n: int, seed: bytes) -> list[bytes]:
    return [merkle.leaf_hash(seed + i.to_bytes(4, "big")) for i in range(n)]


@settings(max_examples=150, deadline=None)
@given(_tree_mi())
def test_every_m_n_i_round_trips(t):
    n, m, i, seed = t
    leaves = _leaves(n, seed)
    rn, rm = merkle.root(leaves), merkle.root(leaves[:m])
    assert merkle_proofs.verify_inclusion(leaves[i], i, n, merkle_proofs.inclusion_proof(leaves, i), rn)
    assert merkle_proofs.verify_consistency(m, n, rm, rn, merkle_proofs.consistency_proof(leaves, m))
    if m >= 1 and i < m:  # inclusion in the old tree too
        assert merkle_proofs.verify_inclusion(leaves[i], i, m, merkle_proofs.inclusion_proof(leaves[:m], i), rm)


@settings(max_examples=150, deadline=None)
@given(_tree_mi(), st.data())
def test_any_flipped_bit_fails(t, data):
    n, m, i, seed = t
    leaves = _leaves(n, seed)
    rn, rm = merkle.root(leaves), merkle.root(leaves[:m])
    ip = merkle_proofs.inclusion_proof(leaves, i)
    # the leaf, the root, or any proof element: one flipped bit anywhere breaks the proof
    parts = [leaves[i], rn] + ip
    k = data.draw(st.integers(0, len(parts) - 1))
    bit = data.draw(st.integers(0, 255))
    parts[k] = parts[k][: bit // 8] + bytes([parts[k][bit // 8] ^ (1 << (bit % 8))]) + parts[k][bit // 8 + 1 :]
    assert not merkle_proofs.verify_inclusion(parts[0], i, n, parts[2:], parts[1])
    cp = merkle_proofs.consistency_proof(leaves, m)
    if 0 < m < n:
        parts = [rm, rn] + cp
        k = data.draw(st.integers(0, len(parts) - 1))
        parts[k] = parts[k][: bit // 8] + bytes([parts[k][bit // 8] ^ (1 << (bit % 8))]) + parts[k][bit // 8 + 1 :]
        assert not merkle_proofs.verify_consistency(m, n, parts[0], parts[1], parts[2:])


@settings(max_examples=100, deadline=None)
@given(_tree_mi(), st.integers(1, 50))
def test_a_forked_log_is_not_consistent(t, extra):
    # A log that rewrote entry j < m cannot prove the old root extends into its new root.
    n, m, _i, seed = t
    if m == 0:
        return
    leaves = _leaves(n + extra, seed)
    j = (n * 7 + extra) % m
    fork = list(leaves)
    fork[j] = merkle.leaf_hash(b"rewritten" + seed)
    proof = merkle_proofs.consistency_proof(fork, m)
    assert not merkle_proofs.verify_consistency(m, len(fork), merkle.root(leaves[:m]), merkle.root(fork), proof)
