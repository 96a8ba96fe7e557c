"""Tampering with any ledger row (change, delete, insert, reorder) makes verify fail and name it."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from exfilguard.ledger import load_private_key, merkle, open_ledger
from exfilguard.ledger import reads
from exfilguard.ledger.keytools import generate_keypair, load_public_key
from exfilguard.ledger.verify import verify_ledger
from exfilguard.ledger.events import decode_event, encode_event
from exfilguard.ledger.keys import sign_tree_head

EXFILGUARD = [sys.executable, "-m", "exfilguard.cli.main"]


def build(url: str, keyfile) -> int:
    """Write a realistic log: start, reservations, renewals, releases, a denial, heads; return size."""
    key = load_private_key(keyfile)
    led = open_ledger(url)
    led.ensure_budget("b", 10_000)
    led.record("meter_start", budget="b", meter="m", pid=1, listen="l", upstream="u", block=1000, key=None)
    rs = [led.reserve("b", 1000, "m", i) for i in range(4)]
    led.batch([("settle", ([(rs[0].res, 1000)], "b", 1000, "m", 0))])
    led.release(rs[1].res, 10)
    head = reads.tree_head(led)
    led.add_tree_head(sign_tree_head(key, head.tree_size, head.ts, head.root))
    for i in range(5):
        led.reserve("b", 1500, "m", 10 + i)
    led.reserve("b", 5000, "m", 20)  # a denial
    led.record("meter_stop", budget="b", meter="m", bytes_out=0, bytes_in=0)
    head = reads.tree_head(led)
    led.add_tree_head(sign_tree_head(key, head.tree_size, head.ts + 1, head.root))
    size = head.tree_size
    led.close()
    return size


@pytest.fixture
def keyfile(tmp_path):
    priv, _pub = generate_keypair(tmp_path / "meter.key")
    return priv


def _sqlite(url):
    conn = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
    return conn


def _pg(url):
    import psycopg

    return psycopg.connect(url, autocommit=True)


class Db:
    """Direct row access, as an attacker with database access has it."""

    def __init__(self, url):
        self.pg = url.startswith("postgresql")
        self.conn = _pg(url) if self.pg else _sqlite(url)

    def q(self, sql, params=()):
        if self.pg:
            sql = sql.replace("?", "%s")
        cur = self.conn.execute(sql, params)
        try:
            return cur.fetchall()
        except Exception:
            return []

    def entry(self, seq):
        return bytes(self.q("SELECT entry FROM events WHERE seq = ?", (seq,))[0][0])


def verify(url, keyfile):
    return verify_ledger(open_ledger(url, create=False), [load_public_key(f"{keyfile}.pub")])


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger(request, tmp_path, keyfile):
    url = f"sqlite:///{tmp_path}/ledger.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    size = build(url, keyfile)
    return url, size


def test_untouched_ledger_verifies(ledger, keyfile):
    url, size = ledger
    rep = verify(url, keyfile)
    assert rep.ok, rep.problems
    assert rep.tree_size == size and rep.signed_heads == 2 and rep.unsigned_tail == 0


def test_changed_row_is_named(ledger, keyfile):
    url, _ = ledger
    db = Db(url)
    ev = decode_event(db.entry(5))
    assert ev["kind"] == "reserve"
    ev["amount"] += 1
    db.q("UPDATE events SET entry = ? WHERE seq = 5", (encode_event(ev),))
    rep = verify(url, keyfile)
    assert not rep.ok
    assert "entry 5 was changed" in rep.problems[0]


def test_changed_bytes_that_do_not_parse_are_named(ledger, keyfile):
    url, _ = ledger
    db = Db(url)
    db.q("UPDATE events SET entry = ? WHERE seq = 7", (db.entry(7) + b" ",))
    rep = verify(url, keyfile)
    assert "entry 7 is malformed" in rep.problems[0]


def test_deleted_row_is_named(ledger, keyfile):
    url, _ = ledger
    Db(url).q("DELETE FROM events WHERE seq = 4")
    rep = verify(url, keyfile)
    assert "entry 4 is missing" in rep.problems[0]


def test_deleted_tail_is_caught(ledger, keyfile):
    url, size = ledger
    Db(url).q("DELETE FROM events WHERE seq >= ?", (size - 2,))
    rep = verify(url, keyfile)
    assert not rep.ok
    assert f"entries {size - 2}..{size - 1}" in " ".join(rep.problems)


def test_inserted_row_is_named(ledger, keyfile):
    url, size = ledger
    db = Db(url)
    k = 6
    prev = decode_event(db.entry(k))["prev"]  # the forger links the new entry in properly
    db.q("UPDATE events SET seq = seq + 1000 WHERE seq >= ?", (k,))
    db.q("UPDATE events SET seq = seq - 999 WHERE seq >= 1000")
    fake = {"v": 1, "seq": k, "ts": decode_event(db.entry(k + 1))["ts"], "kind": "release", "prev": prev,
            "budget": "b", "meter": "m", "res": 3, "used": 0, "returned": 1000, "reserved": 0}
    db.q("INSERT INTO events (seq, entry) VALUES (?, ?)", (k, encode_event(fake)))
    rep = verify(url, keyfile)
    assert not rep.ok
    # the entry that follows carries its old seq: the insertion before it is named
    assert f"position {k + 1} carries seq {k}" in rep.problems[0]


def test_inserted_row_with_renumbered_successor_is_named(ledger, keyfile):
    url, _ = ledger
    db = Db(url)
    k = 6
    original = decode_event(db.entry(k))
    db.q("UPDATE events SET seq = seq + 1000 WHERE seq >= ?", (k,))
    db.q("UPDATE events SET seq = seq - 999 WHERE seq >= 1000")
    fake = {**original, "kind": "deny", "conn": 99, "reason": "cap"}
    for f in ("amount", "reserved"):
        fake.pop(f, None)
    db.q("INSERT INTO events (seq, entry) VALUES (?, ?)", (k, encode_event(fake)))
    moved = dict(original, seq=k + 1)  # the forger also renumbers the entry it displaced
    db.q("UPDATE events SET entry = ? WHERE seq = ?", (encode_event(moved), k + 1))
    rep = verify(url, keyfile)
    assert f"entries {k}..{k} were inserted" in rep.problems[0]


def test_reordered_rows_are_named(ledger, keyfile):
    url, _ = ledger
    db = Db(url)
    a, b = db.entry(8), db.entry(9)
    db.q("UPDATE events SET entry = ? WHERE seq = 8", (b,))
    db.q("UPDATE events SET entry = ? WHERE seq = 9", (a,))
    rep = verify(url, keyfile)
    assert "position 8 carries seq 9" in rep.problems[0]


def test_consistent_rewrite_is_caught_by_the_signed_heads(ledger, keyfile):
    """A forger who rewrites an entry, every later link and the head row still fails the heads."""
    url, size = ledger
    db = Db(url)
    entries = [db.entry(i) for i in range(size)]
    ev = decode_event(entries[3])
    ev["amount"] -= 500
    entries[3] = encode_event(ev)
    for i in range(4, size):
        e = decode_event(entries[i])
        e["prev"] = merkle.leaf_hash(entries[i - 1]).hex()
        if e.get("reserved") is not None:
            e["reserved"] -= 500
        entries[i] = encode_event(e)
    for i in range(3, size):
        db.q("UPDATE events SET entry = ? WHERE seq = ?", (entries[i], i))
    frontier: list[bytes] = []
    for i, e in enumerate(entries):
        frontier = merkle.frontier_append(frontier, i, merkle.leaf_hash(e))
    db.q("UPDATE ledger_head SET frontier = ?, last_leaf = ? WHERE id = 1", (b"".join(frontier), merkle.leaf_hash(entries[-1])))
    db.q("UPDATE budgets SET reserved_bytes = reserved_bytes - 500")
    db.q("UPDATE reservations SET amount = amount - 500 WHERE id = 3")
    rep = verify(url, keyfile)
    assert not rep.ok
    assert "signed tree head #0" in rep.problems[0] and "does not match the entries" in rep.problems[0]


def test_budget_row_change_is_caught(ledger, keyfile):
    url, _ = ledger
    Db(url).q("UPDATE budgets SET reserved_bytes = reserved_bytes - 1000")
    rep = verify(url, keyfile)
    assert "budget 'b' row says" in rep.problems[0]


def test_forged_tree_head_is_caught(ledger, keyfile):
    url, _ = ledger
    Db(url).q("UPDATE tree_heads SET root = ? WHERE tree_size = (SELECT MIN(tree_size) FROM tree_heads)", (bytes(32),))
    rep = verify(url, keyfile)
    assert "bad signature" in rep.problems[0]


def test_wrong_public_key_is_caught(ledger, tmp_path):
    url, _ = ledger
    other, _ = generate_keypair(tmp_path / "other.key")
    rep = verify(url, other)
    assert "unknown key" in rep.problems[0]


def _cli(*args, timeout=60):
    return subprocess.run([*EXFILGUARD, *args], capture_output=True, text=True, timeout=timeout)


def test_cli_verify_exit_codes(tmp_path, keyfile):
    url = f"sqlite:///{tmp_path}/ledger.db"
    build(url, keyfile)
    ok = _cli("ledger", "verify", "--ledger", url, "--public-key", f"{keyfile}.pub")
    assert ok.returncode == 0, ok.stderr
    assert "ok:" in ok.stdout
    db = Db(url)
    ev = decode_event(db.entry(5))
    ev["amount"] = 1
    db.q("UPDATE events SET entry = ? WHERE seq = 5", (encode_event(ev),))
    bad = _cli("ledger", "verify", "--ledger", url, "--public-key", f"{keyfile}.pub")
    assert bad.returncode == 5
    assert "entry 5 was changed" in bad.stderr
    js = _cli("ledger", "verify", "--ledger", url, "--public-key", f"{keyfile}.pub", "--json")
    assert js.returncode == 5 and json.loads(js.stdout)["ok"] is False
    missing = _cli("ledger", "verify", "--ledger", url, "--public-key", str(tmp_path / "nope.pub"))
    assert missing.returncode == 2 and "cannot read public key" in missing.stderr


def test_cli_status_json(tmp_path, keyfile):
    url = f"sqlite:///{tmp_path}/ledger.db"
    build(url, keyfile)
    out = _cli("ledger", "status", "--ledger", url, "--budget", "b", "--json")
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    want = {"budget": str, "cap_bytes": int, "used_bytes": int, "reserved_bytes": int, "remaining_bytes": int,
            "tree_size": int, "root": str}
    for k, t in want.items():
        assert isinstance(st[k], t), k
    assert st["remaining_bytes"] == st["cap_bytes"] - st["reserved_bytes"]
    assert len(bytes.fromhex(st["root"])) == 32
    nobudget = _cli("ledger", "status", "--ledger", url, "--budget", "zzz", "--json")
    assert nobudget.returncode == 2 and "no budget 'zzz'" in nobudget.stderr
    nofile = _cli("ledger", "status", "--ledger", f"sqlite:///{tmp_path}/absent.db")
    assert nofile.returncode == 2 and "no ledger" in nofile.stderr


def test_cli_keys_new(tmp_path):
    out = _cli("keys", "new", "--out", str(tmp_path / "k" / "meter.key"))
    assert out.returncode == 0, out.stderr
    priv = tmp_path / "k" / "meter.key"
    assert priv.exists() and (tmp_path / "k" / "meter.key.pub").exists()
    assert os.stat(priv).st_mode & 0o777 == 0o600
    load_private_key(priv)
    load_public_key(f"{priv}.pub")
    again = _cli("keys", "new", "--out", str(priv))
    assert again.returncode == 2 and "already exists" in again.stderr
