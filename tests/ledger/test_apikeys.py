"""API keys in the ledger: add, look up, revoke, budgets that never pass their cap, audit."""

from __future__ import annotations

import sqlite3

import pytest

from exfilguard.errors import ConfigError
from exfilguard.ledger.apikeys import UNLIMITED, KeyStore, hash_key, remaining_of
from exfilguard.ledger import reads
from exfilguard.ledger import Window, open_ledger
from exfilguard.ledger.verify import verify_ledger


@pytest.fixture
def store(tmp_path):
    return KeyStore(open_ledger(f"sqlite:///{tmp_path / 'keys.sqlite'}"))


def test_add_lookup_revoke(store):
    secret = store.add("alice", cap=1000, windows=[Window(3600, 500)])
    assert secret.startswith("sk-exfilguard-") and len(secret) > 40
    k = store.lookup(secret)
    assert k is not None and k.name == "alice" and k.budget == "key:alice" and k.key_id == hash_key(secret)[:16]
    assert store.lookup(secret + "x") is None
    st = store.status(k)
    assert (st.cap_bytes, st.used_bytes, remaining_of(st)) == (1000, 0, 500)
    store.revoke("alice")
    assert store.lookup(secret) is None
    assert [(x.name, x.active) for x in store.keys()] == [("alice", False)]


def test_secret_is_stored_only_hashed(store, tmp_path):
    secret = store.add("bob")
    raw = (tmp_path / "keys.sqlite").read_bytes()
    wal = tmp_path / "keys.sqlite-wal"
    raw += wal.read_bytes() if wal.exists() else b""
    assert secret.encode() not in raw
    assert store.status(store.lookup(secret)).cap_bytes == UNLIMITED


@pytest.mark.parametrize("name", ["", "has space", "-lead", "x" * 65, "semi;colon"])
def test_bad_names_refused(store, name):
    with pytest.raises(ConfigError):
        store.add(name)
    assert store.keys() == []


def test_duplicate_and_unknown_refused(store):
    store.add("carol")
    with pytest.raises(ConfigError, match="exists already"):
        store.add("carol")
    with pytest.raises(ConfigError, match="no key"):
        store.revoke("dave")
    store.revoke("carol")
    with pytest.raises(ConfigError, match="revoked already"):
        store.revoke("carol")
    with pytest.raises(ConfigError, match="exists already"):
        store.add("carol")  # a revoked name is not reused: its history stays its own


def test_key_budget_never_passes_its_cap_and_overrun_is_recorded(store, tmp_path):
    k = store.lookup(store.add("erin", cap=100))
    g = store.reserve(k, 80)
    assert g.granted == 80
    g2 = store.reserve(k, 80)
    assert g2.granted == 20 and g2.reason == "cap"
    assert store.reserve(k, 1).granted == 0
    store.release(g.res, 80)
    store.release(g2.res, 20)
    store.overrun(k, 7)
    st = store.status(k)
    assert st.used_bytes == 100 and st.remaining_bytes == 0
    assert store.retry_after(k) is None  # the cap, not a window, is spent
    # the database itself refuses a debit past the cap
    db = sqlite3.connect(tmp_path / "keys.sqlite")
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("UPDATE budgets SET reserved_bytes = 101 WHERE name = 'key:erin'")
    rep = verify_ledger(store.ledger)
    assert rep.ok, rep.problems
    kinds = [e for _, e in reads.entries(store.ledger)]
    assert any(b'"kind":"key_overrun"' in e and b'"bytes":7' in e for e in kinds)


def test_window_spent_gives_retry_after(store):
    k = store.lookup(store.add("fay", cap=10_000, windows=[Window(600, 50)]))
    g = store.reserve(k, 50)
    store.release(g.res, 50)
    d = store.reserve(k, 10)
    assert d.granted == 0 and d.reason.startswith("window")
    ra = store.retry_after(k)
    assert ra is not None and 590 <= ra <= 600


def test_tampered_key_budget_row_is_caught(store, tmp_path):
    k = store.lookup(store.add("gil", cap=1000))
    g = store.reserve(k, 100)
    store.release(g.res, 60)
    db = sqlite3.connect(tmp_path / "keys.sqlite")
    db.execute("UPDATE budgets SET reserved_bytes = 0, outstanding_bytes = 0 WHERE name = 'key:gil'")
    db.commit()
    rep = verify_ledger(store.ledger)
    assert not rep.ok and "key:gil" in rep.problems[0]


@pytest.mark.postgres
def test_keys_on_postgresql(pg_url):
    store = KeyStore(open_ledger(pg_url))
    secret = store.add("pat", cap=100, windows=[Window(60, 70)])
    k = store.lookup(secret)
    g = store.reserve(k, 100)
    assert g.granted == 70 and g.reason.startswith("window")
    store.release(g.res, 65)
    assert store.retry_after(k) is not None
    store.revoke("pat")
    assert store.lookup(secret) is None
    assert verify_ledger(store.ledger).ok
