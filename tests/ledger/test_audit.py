"""External audit: checkpoints, consistency and inclusion proofs made from a real ledger (SQLite
and PostgreSQL) and checked offline; a tampered or forked ledger, checkpoint or proof is caught."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exfilguard.errors import ConfigError, LedgerTampered
from exfilguard.ledger import approvals as A
from exfilguard.ledger import reads
from exfilguard.ledger import load_private_key, merkle, merkle_proofs, open_ledger
from exfilguard.ledger.keytools import generate_keypair, load_public_key
from exfilguard.ledger.checkpoint import Checkpoint, head_to_json, load_checkpoint, make_checkpoint, write_checkpoint
from exfilguard.ledger.events import decode_event, encode_event
from sqlkit import forge
from exfilguard.ledger.keys import sign_tree_head
from exfilguard.ledger.proofs import (
    ConsistencyProof,
    check_consistency,
    check_inclusion,
    load_proof,
    prove_consistency,
    prove_inclusion,
    write_proof,
)

EXFILGUARD = [sys.executable, "-m", "exfilguard.cli.main"]


def _cli(*args):
    return subprocess.run([*EXFILGUARD, *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def world(url, tmp_path):
    """A ledger with traffic, a k-of-n raise between two checkpoints written to files."""
    mkey, _ = generate_keypair(tmp_path / "meter.key")
    approvers = [Ed25519PrivateKey.generate() for _ in range(2)]
    led = open_ledger(url)
    led.ensure_budget("b", 10_000)
    A.init_approvers(led, "b", 2, [k.public_key() for k in approvers])
    for i in range(5):
        g = led.reserve("b", 1000, "m", i)
        led.release(g.res, 600)
    write_checkpoint(tmp_path / "cp1.json", make_checkpoint(led, load_private_key(mkey)))
    req = A.make_request(led, "b", reason="launch", expires_in=3600, new_cap=50_000)
    raise_seq = A.apply_request(led, req, [A.approve(req, k) for k in approvers])
    for i in range(7):
        led.reserve("b", 700, "m", 10 + i)
    write_checkpoint(tmp_path / "cp2.json", make_checkpoint(led, load_private_key(mkey)))
    led.close()
    return {"url": url, "dir": tmp_path, "mkey": mkey, "pub": tmp_path / "meter.key.pub", "raise_seq": raise_seq}


def test_checkpoint_holds_totals_and_signatures(world):
    pub = load_public_key(world["pub"])
    cp1 = load_checkpoint(world["dir"] / "cp1.json", [pub])
    cp2 = load_checkpoint(world["dir"] / "cp2.json", [pub])
    assert cp1.budgets == [{"budget": "b", "cap_bytes": 10_000, "used_bytes": 3000}]
    assert cp2.budgets == [{"budget": "b", "cap_bytes": 50_000, "used_bytes": 3000 + 7 * 700}]
    led = open_ledger(world["url"], create=False)
    assert cp2.head.tree_size == reads.tree_head(led).tree_size
    assert cp2.head.root == reads.tree_head(led).root
    led.close()
    # a bare signed head is accepted wherever a checkpoint is
    (world["dir"] / "head.json").write_text(json.dumps(head_to_json(cp2.head)))
    bare = load_checkpoint(world["dir"] / "head.json", [pub])
    assert bare.head == cp2.head and bare.budgets == []


def test_cli_consistency_proof_checks_offline(world, tmp_path):
    d = world["dir"]
    out = _cli("ledger", "prove", "--ledger", world["url"], "--old", d / "cp1.json", "--new", d / "cp2.json", "--out", d / "p.json")
    assert out.returncode == 0, out.stderr
    if world["url"].startswith("sqlite"):  # offline: the auditor has no ledger at all
        (tmp_path / "ledger.db").unlink()
    ok = _cli("audit", "verify", "--old", d / "cp1.json", "--new", d / "cp2.json", "--proof", d / "p.json", "--public-key", world["pub"])
    assert ok.returncode == 0, ok.stderr
    assert "history was not rewritten" in ok.stdout
    assert "budget b: cap 50000 B (cap was 10000 B), used 7900 B" in ok.stdout
    js = _cli("audit", "verify", "--old", d / "cp1.json", "--new", d / "cp2.json", "--proof", d / "p.json",
              "--public-key", world["pub"], "--json")
    assert js.returncode == 0 and json.loads(js.stdout)["ok"] is True


def test_cli_inclusion_proof_of_a_cap_raise(world):
    d, seq = world["dir"], world["raise_seq"]
    out = _cli("ledger", "prove", "--ledger", world["url"], "--entry", seq, "--checkpoint", d / "cp2.json", "--out", d / "i.json")
    assert out.returncode == 0, out.stderr
    ok = _cli("audit", "verify", "--checkpoint", d / "cp2.json", "--proof", d / "i.json", "--public-key", world["pub"], "--json")
    assert ok.returncode == 0, ok.stderr
    rep = json.loads(ok.stdout)
    assert rep["event"]["kind"] == "cap_change" and rep["event"]["new_cap"] == 50_000
    assert len(rep["approvers"]) == 2
    # the entry in the proof file edited: caught
    p = json.loads((d / "i.json").read_text())
    ev = decode_event(p["entry"].encode())
    ev["new_cap"] = 10**12
    p["entry"] = encode_event(ev).decode()
    (d / "i2.json").write_text(json.dumps(p))
    bad = _cli("audit", "verify", "--checkpoint", d / "cp2.json", "--proof", d / "i2.json", "--public-key", world["pub"])
    assert bad.returncode == 5 and f"entry {seq} as given is NOT in the checkpoint's log" in bad.stderr
    # an entry past the checkpoint: a clear refusal
    past = _cli("ledger", "prove", "--ledger", world["url"], "--entry", 10**6, "--checkpoint", d / "cp2.json", "--out", d / "x.json")
    assert past.returncode == 2 and "not in a checkpoint" in past.stderr


def test_tampered_checkpoint_or_proof_is_caught(world):
    d = world["dir"]
    pub = load_public_key(world["pub"])
    cp1, cp2 = load_checkpoint(d / "cp1.json", [pub]), load_checkpoint(d / "cp2.json", [pub])
    led = open_ledger(world["url"], create=False)
    proof = prove_consistency(led, cp1.head, cp2.head)
    led.close()
    check_consistency(cp1, cp2, proof)
    # budgets raised in the file after signing
    obj = json.loads((d / "cp2.json").read_text())
    obj["budgets"][0]["used_bytes"] = 0
    (d / "cp2x.json").write_text(json.dumps(obj))
    with pytest.raises(LedgerTampered, match="checkpoint's signature does not verify"):
        load_checkpoint(d / "cp2x.json", [pub])
    # checkpoint signature stripped so that it passes as a bare head: still refused
    obj["signature"] = ""
    (d / "cp2y.json").write_text(json.dumps(obj))
    with pytest.raises(LedgerTampered):
        load_checkpoint(d / "cp2y.json", [pub])
    # a key the auditor does not trust
    with pytest.raises(LedgerTampered, match="none of the --public-key keys"):
        load_checkpoint(d / "cp2.json", [Ed25519PrivateKey.generate().public_key()])
    # every bit of every proof hash matters
    for k in range(len(proof.path)):
        bad = list(proof.path)
        bad[k] = bytes([bad[k][0] ^ 1]) + bad[k][1:]
        with pytest.raises(LedgerTampered, match="NOT an extension"):
            check_consistency(cp1, cp2, ConsistencyProof(proof.old_size, proof.old_root, proof.new_size, proof.new_root, bad))
    # a proof for other checkpoints, and the checkpoints swapped
    with pytest.raises(LedgerTampered):
        check_consistency(cp2, cp1, proof)
    # malformed proof files are configuration errors, not crashes
    (d / "junk.json").write_text('{"type": "exfilguard-consistency-proof-v1", "proof": ["zz"]}')
    with pytest.raises(ConfigError, match="malformed"):
        load_proof(d / "junk.json")
    out = _cli("audit", "verify", "--old", d / "cp1.json", "--new", d / "cp2.json", "--proof", d / "junk.json", "--public-key", world["pub"])
    assert out.returncode == 2


def _edit_entry(url, seq, change):
    if url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
        ph = "?"
    else:
        import psycopg

        conn = psycopg.connect(url, autocommit=True)
        ph = "%s"
    entry = bytes(conn.execute(f"SELECT entry FROM events WHERE seq = {ph}", (seq,)).fetchone()[0])
    ev = decode_event(entry)
    change(ev)
    conn.execute(f"UPDATE events SET entry = {ph} WHERE seq = {ph}", (encode_event(ev), seq))
    conn.close()


def test_rewritten_history_is_refused_by_prove(world):
    d = world["dir"]
    # the operator rewrites a reservation that both checkpoints cover
    _edit_entry(world["url"], 3, lambda ev: ev.update(amount=1))
    out = _cli("ledger", "prove", "--ledger", world["url"], "--old", d / "cp1.json", "--new", d / "cp2.json", "--out", d / "p.json")
    assert out.returncode == 5 and "history was rewritten" in out.stderr
    inc = _cli("ledger", "prove", "--ledger", world["url"], "--entry", 3, "--checkpoint", d / "cp1.json", "--out", d / "i.json")
    assert inc.returncode == 5


def test_forked_ledger_cannot_prove_consistency(world):
    """A fork that rewrote old entries and re-signed a new head (the meter key stolen) is caught."""
    d = world["dir"]
    pub = load_public_key(world["pub"])
    cp1 = load_checkpoint(d / "cp1.json", [pub])
    led = open_ledger(world["url"], create=False)
    entries = [e for _, e in reads.entries(led)]
    led.close()
    # the fork: entry 3 (before cp1) rewritten, later entries kept; a head over it signed
    forked = list(entries)
    ev = decode_event(forked[3])
    ev["amount"] = 1
    forked[3] = encode_event(ev)
    leaves = [merkle.leaf_hash(e) for e in forked]
    head = sign_tree_head(load_private_key(world["mkey"]), len(leaves), cp1.head.ts + 1, merkle.root(leaves))
    write_checkpoint(d / "fork.json", Checkpoint(head))
    # the best proof the forger can make, from the forked tree
    write_proof(d / "fp.json", ConsistencyProof(cp1.head.tree_size, cp1.head.root, head.tree_size, head.root,
                                                merkle_proofs.consistency_proof(leaves, cp1.head.tree_size)))
    out = _cli("audit", "verify", "--old", d / "cp1.json", "--new", d / "fork.json", "--proof", d / "fp.json", "--public-key", world["pub"])
    assert out.returncode == 5 and "NOT an extension" in out.stderr and "rewritten or forked" in out.stderr
    # and the honest ledger refuses to prove the fork's head
    led = open_ledger(world["url"], create=False)
    with pytest.raises(LedgerTampered, match="new checkpoint"):
        prove_consistency(led, cp1.head, head)
    led.close()


def test_inclusion_of_a_forged_cap_change_fails_its_signature_check(world):
    """An entry that is in the log but whose approvals do not verify is reported, not trusted."""
    d = world["dir"]
    led = open_ledger(world["url"], create=False)
    req = A.make_request(led, "b", reason="sneak", expires_in=3600, new_cap=10**9)
    a = A.approve(req, Ed25519PrivateKey.generate())
    forged = {"public_key": req["approvers"]["keys"][0], "signature": a["signature"]}  # a real approver's key, a wrong signature
    seq = forge(world["url"], "cap_change", budget="b", old_cap=50_000, new_cap=10**9, approvals=[forged], request=req)
    # make_checkpoint refuses a ledger that does not verify, so sign the head the way the meter
    # publishes it (a bare signed tree head)
    th = reads.tree_head(led)
    cp = Checkpoint(sign_tree_head(load_private_key(world["mkey"]), th.tree_size, th.ts, th.root))
    proof = prove_inclusion(led, seq, cp.head)
    led.close()
    assert check_inclusion(cp, proof)["kind"] == "cap_change"  # it is in the log ...
    write_checkpoint(d / "cp3.json", cp)
    write_proof(d / "i3.json", proof)
    out = _cli("audit", "verify", "--checkpoint", d / "cp3.json", "--proof", d / "i3.json", "--public-key", world["pub"])
    assert out.returncode == 5 and "do not verify" in out.stderr  # ... and its approvals are forged


def test_cli_checkpoint_of_a_frozen_ledger(tmp_path):
    """`ledger checkpoint` reads only: a ledger frozen with chmod a-w can still be checkpointed."""
    import os

    url = f"sqlite:///{tmp_path}/l.db"
    led = open_ledger(url)
    led.ensure_budget("b", 500)
    led.reserve("b", 123, "m", 1)
    size = reads.tree_head(led).tree_size
    led.close()
    generate_keypair(tmp_path / "m.key")
    os.chmod(tmp_path / "l.db", 0o444)
    out = _cli("ledger", "checkpoint", "--ledger", url, "--signing-key", tmp_path / "m.key", "--out", tmp_path / "cp.json")
    assert out.returncode == 0, out.stderr
    cp = load_checkpoint(tmp_path / "cp.json", [load_public_key(tmp_path / "m.key.pub")])
    assert cp.head.tree_size == size and cp.budgets == [{"budget": "b", "cap_bytes": 500, "used_bytes": 123}]
    nokey = _cli("ledger", "checkpoint", "--ledger", url, "--signing-key", tmp_path / "none.key", "--out", tmp_path / "x.json")
    assert nokey.returncode == 2 and "cannot read signing key" in nokey.stderr


def test_checkpoint_totals_belong_to_its_tree_size_under_traffic(url, tmp_path):
    import threading

    led = open_ledger(url)
    led.ensure_budget("b", 10**9)
    stop = threading.Event()

    def traffic():
        other = open_ledger(url, create=False)
        i = 0
        while not stop.is_set():
            g = other.reserve("b", 100 + i % 7, "m", i)
            other.release(g.res, i % 5)
            i += 1
        other.close()

    t = threading.Thread(target=traffic)
    t.start()
    key = Ed25519PrivateKey.generate()
    try:
        cps = [make_checkpoint(led, key) for _ in range(8)]
    finally:
        stop.set()
        t.join()
    entries = [decode_event(e) for _, e in reads.entries(led)]
    for cp in cps:
        reserved = 0
        for ev in entries[: cp.head.tree_size]:
            reserved += ev["amount"] if ev["kind"] == "reserve" else -ev["returned"] if ev["kind"] == "release" else 0
        assert cp.budgets == [{"budget": "b", "cap_bytes": 10**9, "used_bytes": reserved}]
        assert cp.head.root == merkle.root([merkle.leaf_hash(ev_b) for _, ev_b in list(reads.entries(led))[: cp.head.tree_size]])
    led.close()
