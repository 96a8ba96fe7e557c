"""Ledger accounting on real SQLite and PostgreSQL: exact cap, windows, refusals, verify."""

from __future__ import annotations

import threading

import pytest

from exfilguard.errors import ConfigError, LedgerUnavailable
from exfilguard.ledger import Window, merkle, open_ledger
from exfilguard.ledger import reads
from exfilguard.ledger.verify import verify_ledger
from exfilguard.ledger.events import decode_event, encode_event


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    return request.getfixturevalue("pg_url")


def test_exact_cap_and_partial_grant(url):
    led = open_ledger(url)
    led.ensure_budget("b", 1000)
    g1 = led.reserve("b", 600, "m", 1)
    g2 = led.reserve("b", 600, "m", 2)
    g3 = led.reserve("b", 600, "m", 3)
    assert (g1.granted, g2.granted, g3.granted) == (600, 400, 0)
    assert g2.reason == "cap" and g3.res is None
    assert led.release(g1.res, 250) == 350
    st = reads.status(led, "b")
    assert (st.cap_bytes, st.reserved_bytes, st.remaining_bytes, st.outstanding_bytes) == (1000, 650, 350, 400)
    assert st.used_bytes == 650
    with pytest.raises(ValueError):
        led.release(g1.res, 1)  # settled already
    rep = verify_ledger(led)
    assert rep.ok, rep.problems
    assert rep.tree_size == st.tree_size
    assert rep.root == st.root
    led.close()


def test_root_in_status_is_rfc6962_root_of_entries(url):
    led = open_ledger(url)
    led.ensure_budget("b", 10)
    led.reserve("b", 3, "m", 1)
    leaves = [merkle.leaf_hash(e) for _, e in reads.entries(led)]
    assert reads.status(led, "b").root == merkle.root(leaves).hex()
    assert [decode_event(e)["kind"] for _, e in reads.entries(led)] == ["budget_created", "reserve"]


def test_cap_change_on_restart_is_refused(url):
    led = open_ledger(url)
    led.ensure_budget("b", 1000)
    led.close()
    led = open_ledger(url)
    with pytest.raises(ConfigError, match="refusing to start with --cap 2000"):
        led.ensure_budget("b", 2000)
    with pytest.raises(ConfigError, match="windows"):
        led.ensure_budget("b", 1000, [Window(60, 10)])
    assert led.ensure_budget("b", 1000).cap_bytes == 1000


def test_windows_cap_the_rate(url):
    led = open_ledger(url)
    led.ensure_budget("w", 10_000, [Window(3600, 700), Window(60, 500)])
    grants = [led.reserve("w", 200, "m", i) for i in range(5)]
    assert [g.granted for g in grants] == [200, 200, 100, 0, 0]
    assert grants[2].reason == "window:60s"
    led.release(grants[0].res, 50)  # returned bytes free the window again
    assert led.reserve("w", 1000, "m", 9).granted == 150
    st = reads.status(led, "w")
    assert {w["seconds"]: w["used_bytes"] for w in st.windows} == {3600: 500, 60: 500}
    assert verify_ledger(led).ok


def test_batch_is_one_transaction(url):
    led = open_ledger(url)
    led.ensure_budget("b", 100)
    g = led.reserve("b", 60, "m", 1)
    out = led.batch([
        ("settle", ([(g.res, 60)], "b", 60, "m", 1)),
        ("reserve", ("b", 60, "m", 2)),
        ("release", (12345, 0, "m")),
        ("record", ("meter_stop", {"budget": "b", "meter": "m", "bytes_out": 0, "bytes_in": 0})),
    ])
    assert out[0].granted == 40 and out[1].granted == 0
    assert isinstance(out[2], ValueError)
    assert isinstance(out[3], int)
    assert verify_ledger(led).ok


def test_concurrent_reservations_never_pass_the_cap(url):
    """Several connections (threads, each its own ledger handle) race for the last bytes."""
    open_ledger(url).ensure_budget("r", 5000)
    granted = []
    lock = threading.Lock()

    def worker(i):
        led = open_ledger(url)
        while True:
            g = led.reserve("r", 97, "m", i)
            if not g.granted:
                break
            with lock:
                granted.append(g.granted)
        led.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 5000
    led = open_ledger(url)
    assert reads.status(led, "r").remaining_bytes == 0
    assert verify_ledger(led).ok


def test_bad_urls():
    with pytest.raises(ConfigError, match="unknown ledger URL scheme"):
        open_ledger("mysql://localhost/x")
    with pytest.raises(ConfigError):
        open_ledger("ledger.db")
    with pytest.raises(ConfigError, match="does not exist"):
        open_ledger("sqlite:////nonexistent/dir/ledger.db")
    with pytest.raises(LedgerUnavailable):
        open_ledger("postgresql://nobody@127.0.0.1:1/x")


def test_event_encoding_is_canonical():
    ev = {"v": 1, "seq": 3, "ts": 5, "kind": "deny", "prev": "0" * 64, "budget": "b", "meter": "m", "conn": 1, "reason": "cap"}
    raw = encode_event(ev)
    assert raw == b'{"budget":"b","conn":1,"kind":"deny","meter":"m","prev":"' + b"0" * 64 + b'","reason":"cap","seq":3,"ts":5,"v":1}'
    assert decode_event(raw) == ev
    with pytest.raises(ValueError, match="canonical"):
        decode_event(raw.replace(b",", b", ", 1))
    with pytest.raises(ValueError):
        encode_event({**ev, "kind": "bogus"})
