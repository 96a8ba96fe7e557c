"""Finding 1 of issue 11: rollback and truncation are caught by heads kept outside the ledger."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from exfilguard.errors import ConfigError, LedgerTampered
from exfilguard.ledger import load_private_key, merkle, open_ledger
from exfilguard.ledger import reads
from exfilguard.ledger.keytools import generate_keypair, load_public_key
from exfilguard.ledger.verify import verify_ledger
from exfilguard.ledger.checkpoint import (
    head_to_json,
    load_checkpoint,
    make_checkpoint,
    write_checkpoint,
)
from exfilguard.ledger.keys import sign_tree_head

from sqlkit import q

EXFILGUARD = [sys.executable, "-m", "exfilguard.cli.main"]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def keyfile(tmp_path):
    priv, _pub = generate_keypair(tmp_path / "meter.key")
    return priv


def sign(led, key, bump: int = 0):
    h = reads.tree_head(led)
    sth = sign_tree_head(key, h.tree_size, h.ts + bump, h.root)
    led.add_tree_head(sth)
    return sth


def build(url: str, keyfile) -> tuple[int, object]:
    """A log with a signed head at size k, then events with no table effect and a last head; return (k, last head)."""
    key = load_private_key(keyfile)
    led = open_ledger(url)
    led.ensure_budget("b", 10_000)
    g = led.reserve("b", 1000, "m", 1)
    led.release(g.res, 700)
    sign(led, key)
    k = reads.tree_head(led).tree_size
    led.record("meter_start", budget="b", meter="m2", pid=2, listen="l", upstream="u", block=1000, key=None)
    led.record("deny", budget="b", meter="m2", conn=1, reason="window:60s")
    led.record("meter_stop", budget="b", meter="m2", bytes_out=0, bytes_in=0)
    last = sign(led, key, 1)
    led.close()
    return k, last


def rollback(url: str, k: int) -> None:
    """Delete the entries after k and the heads that cover them; rewrite the head row to match."""
    led = open_ledger(url, create=False)
    entries = [e for _, e in reads.entries(led)][:k]
    led.close()
    leaves = [merkle.leaf_hash(e) for e in entries]
    frontier: list[bytes] = []
    for i, h in enumerate(leaves):
        frontier = merkle.frontier_append(frontier, i, h)
    q(url, "DELETE FROM events WHERE seq >= ?", (k,))
    q(url, "DELETE FROM tree_heads WHERE tree_size > ?", (k,))
    q(url, "UPDATE ledger_head SET tree_size = ?, frontier = ?, last_leaf = ? WHERE id = 1", (k, b"".join(frontier), leaves[-1]))


def test_rollback_passes_without_a_trusted_head_but_not_with_one(url, keyfile, tmp_path):
    k, last = build(url, keyfile)
    pub = load_public_key(f"{keyfile}.pub")
    assert verify_ledger(open_ledger(url, create=False), [pub], [last]).ok
    rollback(url, k)
    # The rolled-back ledger is self-consistent: the heads still in it cover its end.
    assert verify_ledger(open_ledger(url, create=False), [pub]).ok
    rep = verify_ledger(open_ledger(url, create=False), [pub], [last])
    assert not rep.ok
    assert f"covers more than the {k} the ledger holds" in rep.problems[0] and "rolled back" in rep.problems[0]


def test_rollback_cli_with_published_head_file(url, keyfile, tmp_path):
    k, last = build(url, keyfile)
    head_file = tmp_path / "head.json"
    head_file.write_text(json.dumps(head_to_json(last)))
    cmd = [*EXFILGUARD, "ledger", "verify", "--ledger", url, "--public-key", f"{keyfile}.pub", "--trusted-head", str(head_file)]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "consistent with 1 trusted heads" in ok.stdout
    rollback(url, k)
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 5
    assert "rolled back" in bad.stderr


def test_deleting_every_head_fails_with_a_public_key(url, keyfile):
    build(url, keyfile)
    q(url, "DELETE FROM tree_heads")
    rep = verify_ledger(open_ledger(url, create=False), [load_public_key(f"{keyfile}.pub")])
    assert not rep.ok and "no signed tree heads, but a public key was given" in rep.problems[0]
    # Without a key it is only a note: nobody asked for a signature.
    rep = verify_ledger(open_ledger(url, create=False))
    assert rep.ok and "no signed tree heads" in rep.notes[0]


def test_deleting_the_last_heads_leaves_an_unsigned_tail(url, keyfile):
    k, last = build(url, keyfile)
    q(url, "DELETE FROM tree_heads WHERE tree_size > ?", (k,))
    key = [load_public_key(f"{keyfile}.pub")]
    # Verified later than the meter's interval allows for an unsigned tail: a problem.
    rep = verify_ledger(open_ledger(url, create=False), key, now=time.time() + 60)
    assert not rep.ok and "not covered by a signed tree head" in rep.problems[0]
    # Verified at once, it is indistinguishable from entries not signed yet: pending, not red ...
    rep = verify_ledger(open_ledger(url, create=False), key)
    assert rep.ok and rep.pending_entries == last.tree_size - k and rep.next_head_in_s is not None
    assert any("not yet signed" in n for n in rep.notes)
    # ... and without a trusted head nothing could tell a rollback: the report says so.
    assert not rep.rollback_detectable and any("rollback to an earlier signed head cannot be detected" in n for n in rep.notes)


def test_a_log_shorter_than_a_signed_head_is_red_at_once(url, keyfile):
    k, last = build(url, keyfile)
    q(url, "DELETE FROM events WHERE seq >= ?", (k,))  # truncated, its later heads kept
    rep = verify_ledger(open_ledger(url, create=False), [load_public_key(f"{keyfile}.pub")])
    assert not rep.ok and any("only" in p and "are stored" in p for p in rep.problems)


def test_rewritten_prefix_is_inconsistent_with_trusted_head(url, keyfile):
    k, last = build(url, keyfile)
    # A different ledger of the same length: the trusted head's root does not match.
    other = f"{url}x" if url.startswith("sqlite") else None
    if other is None:  # PostgreSQL: a head for the same size with another root
        q(url, "DELETE FROM tree_heads")
        fake = sign_tree_head(load_private_key(keyfile), last.tree_size, last.ts, bytes(32))
        rep = verify_ledger(open_ledger(url, create=False), (), [fake])
    else:
        led = open_ledger(other)
        led.ensure_budget("b", 10_000)
        for i in range(last.tree_size - 1):
            led.record("deny", budget="b", meter="m", conn=i, reason="cap")
        rep = verify_ledger(led, (), [last])
    assert not rep.ok and "do not have the root of the trusted head" in rep.problems[0]


def test_checkpoint_roundtrip_and_cli(url, keyfile, tmp_path):
    k, _last = build(url, keyfile)
    cp_path = tmp_path / "cp.json"
    out = subprocess.run([*EXFILGUARD, "ledger", "checkpoint", "--ledger", url, "--signing-key", str(keyfile),
                          "--out", str(cp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cp = load_checkpoint(cp_path, [load_public_key(f"{keyfile}.pub")])
    assert cp.head.tree_size == k + 3
    assert cp.budgets == [{"budget": "b", "cap_bytes": 10_000, "used_bytes": 700}]
    # Never overwritten.
    again = subprocess.run([*EXFILGUARD, "ledger", "checkpoint", "--ledger", url, "--signing-key", str(keyfile),
                            "--out", str(cp_path)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "never overwritten" in again.stderr
    rollback(url, k)
    bad = subprocess.run([*EXFILGUARD, "ledger", "verify", "--ledger", url, "--public-key", f"{keyfile}.pub",
                          "--trusted-head", str(cp_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 5 and "rolled back" in bad.stderr


def test_bad_trusted_heads(url, keyfile, tmp_path):
    build(url, keyfile)
    pub = load_public_key(f"{keyfile}.pub")
    cp = make_checkpoint(open_ledger(url, create=False), load_private_key(keyfile))
    path = tmp_path / "cp.json"
    write_checkpoint(path, cp)
    obj = json.loads(path.read_text())
    # a changed budget in the checkpoint: its signature no longer verifies
    obj["budgets"][0]["used_bytes"] = 1
    (tmp_path / "changed.json").write_text(json.dumps(obj))
    with pytest.raises(LedgerTampered, match="checkpoint's signature"):
        load_checkpoint(tmp_path / "changed.json", [pub])
    # a changed head root
    obj = json.loads(path.read_text())
    obj["head"]["root"] = "00" * 32
    (tmp_path / "root.json").write_text(json.dumps(obj))
    with pytest.raises(LedgerTampered, match="tree head's signature"):
        load_checkpoint(tmp_path / "root.json", [pub])
    # another key
    other, other_pub = generate_keypair(tmp_path / "other.key")
    with pytest.raises(LedgerTampered, match="none of the --public-key"):
        load_checkpoint(path, [load_public_key(other_pub)])
    # not JSON, missing field, missing file
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        load_checkpoint(tmp_path / "junk.json", [pub])
    (tmp_path / "partial.json").write_text(json.dumps({"tree_size": 3}))
    with pytest.raises(ConfigError, match="lacks 'ts'"):
        load_checkpoint(tmp_path / "partial.json", None)
    with pytest.raises(ConfigError, match="cannot read"):
        load_checkpoint(tmp_path / "absent.json", None)
    out = subprocess.run([*EXFILGUARD, "ledger", "verify", "--ledger", url, "--public-key", f"{keyfile}.pub",
                          "--trusted-head", str(tmp_path / "junk.json")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not JSON" in out.stderr


def test_checkpoint_of_tampered_ledger_is_refused(url, keyfile):
    build(url, keyfile)
    q(url, "UPDATE budgets SET reserved_bytes = 0")
    with pytest.raises(LedgerTampered, match="refusing to checkpoint"):
        make_checkpoint(open_ledger(url, create=False), load_private_key(keyfile))
