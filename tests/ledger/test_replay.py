"""The ledger that debits replays the log: summary rows and head rows that disagree with it are refused."""

from __future__ import annotations


import pytest

from exfilguard.errors import LedgerTampered
from exfilguard.ledger import Window, merkle, open_ledger
from exfilguard.ledger import reads
from exfilguard.ledger.verify import verify_ledger
from sqlkit import q


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    return request.getfixturevalue("pg_url")


def exhausted(url: str, cap: int = 400) -> None:
    led = open_ledger(url)
    led.ensure_budget("b", cap, [Window(3600, 10_000)])
    g = led.reserve("b", cap, "m", 1)
    led.release(g.res, cap)
    led.close()


def test_following_two_meters_agrees_with_verify(url):
    a, b = open_ledger(url), open_ledger(url)
    a.ensure_budget("b", 1000, [Window(60, 800)])
    a.follow_log()
    b.follow_log()
    ga = a.reserve("b", 300, "a", 1)
    gb = b.reserve("b", 300, "b", 1)  # b replays a's reserve first
    assert b.reserve("b", 300, "b", 2).granted == 200  # the window: 800
    a.release(ga.res, 100)
    b.release(gb.res, 300)
    assert a.reserve("b", 1000, "a", 2).granted == 200  # 100 + 300 + 200 used in the window
    rep = verify_ledger(a)
    assert rep.ok, rep.problems
    assert rep.state is not None and rep.state.budgets["b"].reserved == reads.status(a, "b").reserved_bytes
    a.close()
    b.close()


def test_lowered_reserved_bytes_refused_at_open(url):
    exhausted(url)
    q(url, "UPDATE budgets SET reserved_bytes = 0 WHERE name = 'b'")
    led = open_ledger(url)
    with pytest.raises(LedgerTampered, match="row says cap=400 reserved=0.*the log says cap=400 reserved=400"):
        led.follow_log()
    led.close()


def test_lowered_reserved_bytes_refused_while_running(url):
    led = open_ledger(url)
    led.ensure_budget("b", 400)
    led.follow_log()
    led.reserve("b", 400, "m", 1)
    q(url, "UPDATE budgets SET reserved_bytes = 0, outstanding_bytes = 0 WHERE name = 'b'")
    with pytest.raises(LedgerTampered, match="reserved=0"):
        led.reserve("b", 300, "m", 2)
    # and it stays refused: the next write replays everything again
    with pytest.raises(LedgerTampered):
        led.reserve("b", 300, "m", 3)
    led.close()
    assert q(url, "SELECT COUNT(*) FROM reservations")[0][0] == 1


def test_window_usage_comes_from_the_log(url):
    exhausted(url, cap=400)
    led = open_ledger(url)
    led.ensure_budget("b", 400, [Window(3600, 10_000)])
    led.follow_log()
    # shrink a settled reservation's used bytes in the table: the window must still count 400
    q(url, "UPDATE reservations SET used = 0")
    with pytest.raises(LedgerTampered):
        led.follow_log()
    led.close()


def test_deleted_reservation_row_refused(url):
    exhausted(url)
    q(url, "DELETE FROM reservations")
    with pytest.raises(LedgerTampered, match="row deleted"):
        open_ledger(url).follow_log()


def test_truncated_log_with_fixed_head_row_refused_when_tables_disagree(url):
    exhausted(url)
    # delete the last event (the release) and rewrite the head row to match the shorter log
    led = open_ledger(url)
    entries = [e for _, e in reads.entries(led)]
    led.close()
    n = len(entries) - 1
    leaves = [merkle.leaf_hash(e) for e in entries[:n]]
    frontier: list[bytes] = []
    for i, h in enumerate(leaves):
        frontier = merkle.frontier_append(frontier, i, h)
    q(url, "DELETE FROM events WHERE seq = ?", (n,))
    q(url, "UPDATE ledger_head SET tree_size = ?, frontier = ?, last_leaf = ? WHERE id = 1", (n, b"".join(frontier), leaves[-1]))
    with pytest.raises(LedgerTampered, match="reservation .* row differs|row says"):
        open_ledger(url).follow_log()


def test_head_row_not_matching_entries_refused(url):
    exhausted(url)
    q(url, "UPDATE ledger_head SET tree_size = tree_size - 1 WHERE id = 1")
    with pytest.raises(LedgerTampered):
        open_ledger(url).follow_log()


def test_changed_entry_refused(url):
    exhausted(url)
    e = q(url, "SELECT entry FROM events WHERE seq = 1")[0][0]
    q(url, "UPDATE events SET entry = ? WHERE seq = 1", (bytes(e).replace(b'"amount":400', b'"amount":40'),))
    with pytest.raises(LedgerTampered, match="entry"):
        open_ledger(url).follow_log()


def _head_and_rows(url: str) -> tuple:
    return (q(url, "SELECT tree_size FROM ledger_head")[0][0], q(url, "SELECT id, used FROM reservations ORDER BY id"))


@pytest.mark.parametrize("tamper", [
    "UPDATE budgets SET reserved_bytes = 0, outstanding_bytes = 0",  # lend again what already left
    "UPDATE budgets SET reserved_bytes = reserved_bytes - 100",
    "UPDATE budgets SET outstanding_bytes = 0",
    "UPDATE budgets SET cap_bytes = 5000",
    "UPDATE budgets SET windows = '[]'",
])
@pytest.mark.parametrize("op", ["reserve", "settle"])
def test_changed_budget_row_between_grants_refused(url, tamper, op):
    """The writes decided on the replayed log are guarded by it: a changed row aborts, nothing is granted."""
    led = open_ledger(url)
    led.ensure_budget("b", 1000, [Window(3600, 900)])
    led.follow_log()
    g = led.reserve("b", 400, "m", 1)
    q(url, tamper)
    before = _head_and_rows(url)
    call = ("reserve", ("b", 300, "m", 2)) if op == "reserve" else ("settle", ([(g.res, 400)], "b", 300, "m", 2))
    with pytest.raises(LedgerTampered, match="budget 'b' row"):
        led.batch([call])
    assert _head_and_rows(url) == before  # rolled back: no event, no reservation, no settlement
    with pytest.raises(LedgerTampered):  # and it stays refused
        led.reserve("b", 1, "m", 3)
    led.close()


@pytest.mark.parametrize("tamper, why", [
    ("UPDATE reservations SET amount = 1000 WHERE id = {r}", "row changed"),  # settle more than was debited
    ("UPDATE reservations SET used = 0 WHERE id = {r}", "row changed"),
    ("UPDATE reservations SET budget = 'x' WHERE id = {r}", "row changed"),
    ("DELETE FROM reservations WHERE id = {r}", "row deleted"),
])
@pytest.mark.parametrize("several", [False, True])
def test_changed_reservation_row_refused_at_settlement(url, tamper, why, several):
    led = open_ledger(url)
    led.ensure_budget("b", 1000)
    led.follow_log()
    g1, g2 = led.reserve("b", 300, "m", 1), led.reserve("b", 300, "m", 2)
    q(url, tamper.format(r=g2.res))
    before = _head_and_rows(url)
    releases = [(g1.res, 100), (g2.res, 100)] if several else [(g2.res, 100)]
    with pytest.raises(LedgerTampered, match=f"reservation {g2.res} .*{why}"):
        led.batch([("settle", (releases, "b", 300, "m", 3))])
    assert _head_and_rows(url) == before
    led.close()
