"""Reads of a ledger for the CLI, the dashboard, governance and the audit: totals, entries, heads.

These read the rows as they are, without replaying the log; the meter never uses them (it decides
on the replayed log and reads only through ``Ledger.checked_status``, store.py). Each function
takes an open ``Ledger`` (``open_ledger``) and raises LedgerUnavailable when the database
cannot answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from exfilguard.errors import ConfigError, LedgerUnavailable
from exfilguard.ledger import merkle, open_ledger
from exfilguard.ledger.accounting import BudgetStatus, windows_from_json
from exfilguard.ledger.keys import TreeHead
from exfilguard.ledger.storage import one_line
from exfilguard.ledger.store import Ledger, unpack_frontier


def query(led: Ledger, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one read (``?`` placeholders); LedgerUnavailable when the database cannot answer."""
    try:
        return led.db.read(led.db.sql(sql), tuple(params))
    except led.db.errors as exc:
        led.db.broken()
        raise LedgerUnavailable(f"ledger {led.url} cannot be read: {one_line(exc)}") from None


def tree_head(led: Ledger) -> TreeHead:
    """Return the current (unsigned) tree head: size, last timestamp and root."""
    rows = query(led, "SELECT tree_size, frontier, last_ts FROM ledger_head WHERE id = 1")
    if not rows:
        raise LedgerUnavailable(f"ledger {led.url} has no head row")
    size, frontier, ts = rows[0]
    return TreeHead(int(size), int(ts), merkle.frontier_root(unpack_frontier(frontier)))


def budgets(led: Ledger) -> list[str]:
    """Return the names of all budgets."""
    return [r[0] for r in query(led, "SELECT name FROM budgets ORDER BY name")]


def status(led: Ledger, budget: str | None = None) -> BudgetStatus:
    """Return one budget's totals as its row says (the only budget when `budget` is None)."""
    names = budgets(led)
    if budget is None:
        if len(names) != 1:
            raise ConfigError(f"ledger {led.url} holds {len(names)} budgets ({', '.join(names) or 'none'}); name one with --budget")
        budget = names[0]
    rows = query(led, "SELECT cap_bytes, reserved_bytes, outstanding_bytes, windows FROM budgets WHERE name = ?", (budget,))
    if not rows:
        raise ConfigError(f"no budget {budget!r} in ledger {led.url} (it has: {', '.join(names) or 'none'})")
    cap, reserved, outstanding = (int(x) for x in rows[0][:3])
    head = tree_head(led)
    now = max(int(time.time() * 1_000_000), head.ts)
    wins = []
    for w in windows_from_json(rows[0][3]):
        used = int(query(led, "SELECT COALESCE(SUM(COALESCE(used, amount)), 0) FROM reservations WHERE budget = ? AND ts > ?",
                         (budget, now - w.seconds * 1_000_000))[0][0])
        wins.append({"seconds": w.seconds, "limit_bytes": w.limit, "used_bytes": used, "remaining_bytes": max(0, w.limit - used)})
    return BudgetStatus(budget=budget, cap_bytes=cap, used_bytes=reserved, reserved_bytes=reserved,
                        remaining_bytes=cap - reserved, outstanding_bytes=outstanding, tree_size=head.tree_size,
                        root=head.root.hex(), windows=wins, forwarded_bytes=reserved - outstanding)


def budget_status(ledger_url: str, budget: str | None = None) -> BudgetStatus:
    """Open the ledger at `ledger_url` read-only and return one budget's totals (LedgerUnavailable, ConfigError)."""
    led = open_ledger(ledger_url, create=False)
    try:
        return status(led, budget)
    finally:
        led.close()


def entries(led: Ledger, start: int = 0, chunk: int = 5000) -> Iterator[tuple[int, bytes]]:
    """Yield (seq, entry bytes) in seq order, from `start`."""
    last = start - 1
    while True:
        rows = query(led, "SELECT seq, entry FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (last, chunk))
        if not rows:
            return
        for seq, entry in rows:
            yield int(seq), bytes(entry)
        last = int(rows[-1][0])


def tree_heads(led: Ledger) -> list[TreeHead]:
    """Return every stored signed tree head, oldest first."""
    rows = query(led, "SELECT tree_size, ts, root, key_id, signature FROM tree_heads ORDER BY ts, tree_size")
    return [TreeHead(int(a), int(b), bytes(c), d, bytes(e)) for a, b, c, d, e in rows]
