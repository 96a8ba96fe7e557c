"""Fuzz the parsers of files that cross a trust boundary (requests, signatures, checkpoints,
proofs): any bytes give the file back or one of exfilguard's errors, never a crash."""

from __future__ import annotations

import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exfilguard.errors import ExfilguardError
from exfilguard.ledger import approvals as A
from exfilguard.ledger.checkpoint import Checkpoint, checkpoint_to_json, load_checkpoint
from exfilguard.ledger.keys import sign_tree_head
from exfilguard.ledger.proofs import load_proof

KEY = Ed25519PrivateKey.generate()
SET = {"threshold": 1, "keys": [A.raw_key(KEY.public_key())]}
REQUEST = {
    "type": A.REQUEST_TYPE, "budget": "b", "action": "cap", "old_cap": 10, "new_cap": 20, "approvers": SET,
    "head": {"tree_size": 3, "ts": 5, "root": "ab" * 32}, "reason": "r", "nonce": "0" * 32,
    "created": 1, "expires": 2,
}
APPROVAL = A.approve(REQUEST, KEY)
HEAD = sign_tree_head(KEY, 3, 5, bytes(32))
CHECKPOINT = checkpoint_to_json(Checkpoint(HEAD, [{"budget": "b", "cap_bytes": 1, "used_bytes": 0}], 1, b"\x01" * 64))
PROOF = {"type": "exfilguard-consistency-proof-v1", "old_size": 1, "old_root": "00" * 32, "new_size": 3,
         "new_root": "11" * 32, "proof": ["22" * 32]}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=70) | st.floats(allow_nan=False),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=5),
    max_leaves=12,
)


def _mutate(base: dict, data) -> dict:
    """Replace, drop or add one field at the top level or one level down."""
    obj = json.loads(json.dumps(base))
    target = obj
    nested = [k for k, v in obj.items() if isinstance(v, dict)]
    if nested and data.draw(st.booleans()):
        target = obj[data.draw(st.sampled_from(nested))]
    op = data.draw(st.sampled_from(["replace", "drop", "add"]))
    key = data.draw(st.sampled_from(sorted(target)))
    if op == "replace":
        target[key] = data.draw(json_values)
    elif op == "drop":
        del target[key]
    else:
        target[data.draw(st.text(max_size=8))] = data.draw(json_values)
    return obj


def _load_all(path) -> None:
    for load in (A.load_request, A.load_approval, load_proof, lambda p: load_checkpoint(p, [KEY.public_key()])):
        try:
            load(path)
        except ExfilguardError:
            pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_random_bytes(tmp_path, blob):
    p = tmp_path / "f.json"
    p.write_bytes(blob)
    _load_all(p)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([REQUEST, APPROVAL, CHECKPOINT, PROOF]), st.data())
def test_mutated_files(tmp_path, base, data):
    p = tmp_path / "f.json"
    obj = _mutate(base, data)
    p.write_text(json.dumps(obj))
    _load_all(p)
    if base is REQUEST:  # a changed request never keeps its approval
        try:
            req = A.check_request(obj)
        except ExfilguardError:
            return
        A.describe(req)  # `budget show` prints anything that parses
        if req != REQUEST:
            assert A.request_digest(req) != APPROVAL["request"]


def test_the_unmutated_files_load(tmp_path):
    for obj, load in ((REQUEST, A.load_request), (APPROVAL, A.load_approval), (PROOF, load_proof)):
        p = tmp_path / "ok.json"
        p.write_text(json.dumps(obj))
        assert load(p)
