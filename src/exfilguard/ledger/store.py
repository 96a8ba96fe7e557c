"""The ledger: an append-only, Merkle-hashed event log over a Storage, and the accounting it adds up to.

Every write is one transaction that first locks the single ``ledger_head`` row (``write``): gap-free
sequence numbers, and a debit decided and recorded atomically, never check-then-write. A writer follows
the log: before its first write it replays all of it (hash chain, the head row's root, and the
``budgets``/``reservations`` rows against what the events add up to), before every later write what
other writers appended. Reserve, release and settle are decided on that state (accounting.py); the
event is appended and the same rules apply it. The rows are a cache: each write to them is guarded by
what the log says they hold and sent at the end of the transaction (one PostgreSQL pipeline); a
changed row matches nothing and rolls the transaction back (LedgerTampered) before anything is granted.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from exfilguard.base_errors import ConfigError, LedgerTampered, LedgerUnavailable
from exfilguard.ledger import merkle
from exfilguard.ledger.accounting import (
    BudgetState, BudgetStatus, Grant, LedgerState, Window, budget_row_problems, check_release, check_settlement,
    decide_reserve, replayed_status, reservation_row_problems, windows_from_json, windows_to_json,
)
from exfilguard.ledger.events import GENESIS_PREV, decode_event, encode_event
from exfilguard.ledger.keys import TreeHead
from exfilguard.ledger.storage import Reads, Storage, one_line


@dataclass
class Head:
    """The head row as a write transaction holds it; appends advance it."""

    tree_size: int
    frontier: list[bytes]
    last_ts: int
    last_leaf: bytes
    now: int  # µs, the clock of this transaction (never before the last entry)


@dataclass
class _Pending:
    """The row writes of one transaction, sent together just before its commit, each guarded by the log."""

    events: list[tuple[int, bytes]] = field(default_factory=list)
    reservations: list[tuple[int, str, int, int]] = field(default_factory=list)  # id, budget, ts, amount
    settled: list[tuple[int, int, str, int]] = field(default_factory=list)  # used, id, budget, amount
    # budget -> (cap, reserved, outstanding, windows json) the log says its row held at first touch
    budgets: dict[str, tuple[int, int, int, str]] = field(default_factory=dict)


def unpack_frontier(blob: Any) -> list[bytes]:
    """The head row's frontier blob as its list of 32-byte hashes."""
    b = bytes(blob)
    return [b[i : i + 32] for i in range(0, len(b), 32)]


class Ledger:
    """The durable, append-only ledger of one database; thread-compatible, not thread-safe.

    Database failures surface as LedgerUnavailable (callers fail closed), a log or row that does
    not add up as LedgerTampered, bad arguments as ValueError or ConfigError.
    """

    def __init__(self, db: Storage):
        self.db = db
        self._state = LedgerState()  # the accounting replayed from the log (at the first write)
        self._stale = True  # replay it all at the next write
        self._frontier: list[bytes] = []
        self._last_leaf = b""
        self._trusted: dict[int, bytes] = {}  # tree_size -> root of heads kept outside the ledger
        self._pending: _Pending | None = None

    @property
    def url(self) -> str:
        return self.db.url

    @property
    def state(self) -> LedgerState:
        """The accounting replayed from the log; current inside a write transaction's body."""
        return self._state

    def close(self) -> None:
        self.db.close()

    # -- transactions ------------------------------------------------------------------
    def write(self, body: Callable[[Any, Head], Any]) -> Any:
        """Run body(cursor, head) in one write transaction holding the head lock, after catching up
        with the log; flush the guarded row writes, commit durably."""
        db = self.db
        try:
            cur = db.begin_write()
            try:
                sql, params = db.head_query()
                row = cur.execute(db.sql(sql), params).fetchone()
                if row is None:
                    raise LedgerUnavailable(f"ledger {self.url} has no head row; it is not an exfilguard ledger")
                size, frontier, last_ts, last_leaf, now = row
                head = Head(int(size), unpack_frontier(frontier), int(last_ts), bytes(last_leaf), max(int(now), int(last_ts)))
                self._catch_up(cur, head)
                self._pending = _Pending()
                start = head.tree_size
                result = body(cur, head)
                if head.tree_size != start or self._pending.budgets:
                    with db.pipeline():  # one round trip for all of it; the rowcounts are checked after
                        checks = self._flush(cur)
                        cur.execute(db.sql("UPDATE ledger_head SET tree_size = ?, frontier = ?, last_ts = ?, last_leaf = ? "
                                           "WHERE id = 1"), (head.tree_size, b"".join(head.frontier), head.last_ts, head.last_leaf))
                    self._check_flushed(cur, checks)
                db.commit()
                return result
            except BaseException:
                self._stale = True  # the replayed state may hold events this transaction appended
                with contextlib.suppress(Exception):
                    db.rollback()
                raise
            finally:
                self._pending = None
        except db.errors as exc:
            db.broken()
            raise LedgerUnavailable(f"ledger {self.url} cannot be written: {one_line(exc)}") from None

    def append(self, cur: Any, head: Head, kind: str, **fields: Any) -> int:
        """Append one event in the open transaction; apply it to the replayed state; return its seq."""
        seq = head.tree_size
        event = {"v": 1, "seq": seq, "ts": head.now, "kind": kind, "prev": head.last_leaf.hex() if seq else GENESIS_PREV}
        event.update(fields)
        entry = encode_event(event)
        assert self._pending is not None
        self._pending.events.append((seq, entry))
        lh = merkle.leaf_hash(entry)
        head.frontier = merkle.frontier_append(head.frontier, seq, lh)
        head.tree_size, head.last_leaf, head.last_ts = seq + 1, lh, head.now
        self._state.apply(event)
        self._frontier, self._last_leaf = head.frontier, lh
        if self._state.problems:  # our own event does not add up: a tampered row slipped past
            raise LedgerTampered(f"ledger {self.url}: {self._state.problems[0]}")
        return seq

    def _touch(self, name: str, b: BudgetState) -> None:
        """Guard the budget's row by what the log says it holds now (once per transaction)."""
        p = self._pending
        assert p is not None
        if name not in p.budgets:
            p.budgets[name] = (b.cap, b.reserved, b.outstanding, windows_to_json([Window(s, n) for s, n in b.windows]))

    def _flush(self, cur: Any) -> list[tuple[str | None, Any, int]]:
        """Send the transaction's row writes; return (budget or None, cursor, rowcount wanted) to check."""
        p, sql = self._pending, self.db.sql
        assert p is not None
        if p.events:
            cur.executemany(sql("INSERT INTO events (seq, entry) VALUES (?, ?)"), p.events)
        if p.reservations:
            cur.executemany(sql("INSERT INTO reservations (id, budget, ts, amount, used) VALUES (?, ?, ?, ?, NULL)"), p.reservations)
        checks: list[tuple[str | None, Any, int]] = []
        if p.settled:
            # one cursor per checked statement: in pipeline mode a cursor keeps only its last result
            c = cur.connection.cursor()
            c.executemany(sql("UPDATE reservations SET used = ? WHERE id = ? AND budget = ? AND amount = ? AND used IS NULL"),
                          p.settled)
            checks.append((None, c, len(p.settled)))
        for name, (cap, reserved, outstanding, wjson) in p.budgets.items():
            b = self._state.budgets[name]
            c = cur.connection.cursor()
            c.execute(sql("UPDATE budgets SET reserved_bytes = ?, outstanding_bytes = ? WHERE name = ? AND cap_bytes = ? "
                          "AND reserved_bytes = ? AND outstanding_bytes = ? AND windows = ?"),
                      (b.reserved, b.outstanding, name, cap, reserved, outstanding, wjson))
            checks.append((name, c, 1))
        return checks

    def _check_flushed(self, cur: Any, checks: list[tuple[str | None, Any, int]]) -> None:
        """Raise LedgerTampered unless every guarded write matched its row: a changed row matches nothing."""
        p, sql = self._pending, self.db.sql
        assert p is not None
        for name, c, want in checks:
            if c.rowcount == want:
                continue
            if name is None:  # which reservation? (the ones that matched hold their new `used` now)
                for used, res, budget, amount in p.settled:
                    row = cur.execute(sql("SELECT budget, amount, used FROM reservations WHERE id = ?"), (res,)).fetchone()
                    if row is None:
                        raise self._tampered(f"reservation {res} is in the log but not in the reservations table (row deleted)")
                    if (row[0], int(row[1]), row[2]) != (budget, amount, used):
                        raise self._tampered(f"reservation {res} row differs from the log (row changed)")
                raise self._tampered("a reservations row differs from the log (row changed)")
            cap, reserved, outstanding, wjson = p.budgets[name]
            row = cur.execute(sql("SELECT name, cap_bytes, reserved_bytes, outstanding_bytes, windows FROM budgets WHERE name = ?"),
                              (name,)).fetchone()
            was = LedgerState(budgets={name: BudgetState(cap, [tuple(w) for w in json.loads(wjson)], reserved, outstanding)})
            rows = [] if row is None else [(row[0], int(row[1]), int(row[2]), int(row[3]), row[4])]
            probs = budget_row_problems(was, rows, [name])
            raise self._tampered(probs[0] if probs else f"budget {name!r} row's windows are not as the log wrote them (row changed)")

    def _tampered(self, msg: str) -> LedgerTampered:
        return LedgerTampered(f"ledger {self.url} does not add up, refusing to use it: {msg}; "
                              "`exfilguard ledger verify` shows every problem")

    # -- the log is the ledger: replay it, and follow it ---------------------------------
    def follow_log(self, trusted: Sequence[TreeHead] = ()) -> LedgerState:
        """Replay the whole log now; raise LedgerTampered when it does not add up.

        Checks the hash chain, that the head row's root is the root of the entries, and that the
        ``budgets`` and ``reservations`` rows are what the log implies. `trusted` heads (kept
        outside the ledger) must be prefixes of the log: a rolled-back or rewritten ledger is refused.
        """
        self._trusted = {h.tree_size: h.root for h in trusted}
        self._stale = True
        self.write(lambda cur, head: None)
        return self._state

    def _catch_up(self, cur: Any, head: Head) -> None:
        """Replay the entries appended since we last looked (all of them when stale); check the head."""
        full, sql = self._stale, self.db.sql
        if full:
            self._state, self._frontier, self._last_leaf = LedgerState(), [], b""
        st = self._state
        if head.tree_size < st.size:
            raise self._tampered(f"it holds {head.tree_size} entries but {st.size} were seen before: entries were deleted (rolled back)")
        seq = st.size
        while seq < head.tree_size:
            rows = cur.execute(sql("SELECT seq, entry FROM events WHERE seq >= ? ORDER BY seq LIMIT 5000"), (seq,)).fetchall()
            if not rows:
                break
            for s, entry in rows:
                entry = bytes(entry)
                if int(s) != seq:
                    raise self._tampered(f"entry {seq} is missing (deleted?)")
                if seq >= head.tree_size:
                    break
                try:
                    ev = decode_event(entry)
                except ValueError as exc:
                    raise self._tampered(f"entry {seq} is malformed: {exc}") from None
                if ev["seq"] != seq or ev["prev"] != (GENESIS_PREV if seq == 0 else self._last_leaf.hex()):
                    raise self._tampered(f"entry {seq} does not link to entry {seq - 1} (an entry was changed, inserted or deleted)")
                lh = merkle.leaf_hash(entry)
                self._frontier = merkle.frontier_append(self._frontier, seq, lh)
                self._last_leaf = lh
                st.apply(ev)
                if st.problems:
                    raise self._tampered(st.problems[0])
                seq += 1
                if seq in self._trusted and merkle.frontier_root(self._frontier) != self._trusted[seq]:
                    raise self._tampered(f"its first {seq} entries do not have the root of the published head of that size (rewritten)")
        if seq != head.tree_size:
            raise self._tampered(f"the head row says {head.tree_size} entries but only {seq} are stored (entries deleted)")
        longest = max(self._trusted, default=0)
        if longest > seq:
            raise self._tampered(f"it holds {seq} entries but a published head covers {longest}: entries were deleted (rolled back)")
        if self._frontier != head.frontier:
            raise self._tampered("the head row's root is not the root of the entries (an entry or the head row was changed)")
        if full:
            extra = int(cur.execute(sql("SELECT COUNT(*) FROM events WHERE seq >= ?"), (seq,)).fetchone()[0])
            if extra:
                raise self._tampered(f"{extra} entries lie beyond the head row's {seq} (inserted, or the head row was rolled back)")
            brows = [(r[0], int(r[1]), int(r[2]), int(r[3]), r[4]) for r in cur.execute(
                sql("SELECT name, cap_bytes, reserved_bytes, outstanding_bytes, windows FROM budgets ORDER BY name")).fetchall()]
            rrows = [(int(a), b, int(c), int(d), None if e is None else int(e)) for a, b, c, d, e in cur.execute(
                sql("SELECT id, budget, ts, amount, used FROM reservations ORDER BY id")).fetchall()]
            probs = budget_row_problems(st, brows) + reservation_row_problems(st, rrows)
            if probs:
                raise self._tampered(probs[0] + (f" (and {len(probs) - 1} more)" if len(probs) > 1 else ""))
        self._stale = False

    # -- write operations: decided on the replayed log (accounting.py) --------------------
    def ensure_budget(self, name: str, cap: int, windows: Sequence[Window] = ()) -> BudgetStatus:
        """Create the budget with this cap and windows, or check that the stored one matches.

        A different cap or window set is refused with ConfigError: raising a cap is a signed
        k-of-n operation, never a command-line flag.
        """
        if cap < 0:
            raise ConfigError("a cap must be a non-negative number of bytes")
        wjson = windows_to_json(windows)

        def body(cur: Any, head: Head) -> None:
            b = self._state.budgets.get(name)
            if b is None:
                self._no_budget_row(cur, name)
                cur.execute(self.db.sql("INSERT INTO budgets (name, cap_bytes, reserved_bytes, outstanding_bytes, windows) "
                                        "VALUES (?, ?, 0, 0, ?)"), (name, cap, wjson))
                self.append(cur, head, "budget_created", budget=name, cap=cap, windows=json.loads(wjson))
                return
            self._touch(name, b)  # the row must be what the log says
            if b.cap != cap:
                raise ConfigError(
                    f"budget {name!r} exists with cap {b.cap} bytes; refusing to start with --cap {cap}: "
                    f"a cap is changed only by a signed k-of-n cap change, never a flag (start with --cap {b.cap})"
                )
            stored = windows_to_json([Window(s, n) for s, n in b.windows])
            if stored != wjson:
                raise ConfigError(f"budget {name!r} exists with windows {_fmt_windows(stored)}; refusing to start with "
                                  f"{_fmt_windows(wjson)}: windows are part of the budget (start with the stored ones)")

        self.write(body)
        return self.checked_status(name)

    def _no_budget_row(self, cur: Any, name: str) -> None:
        """A budget the log never created must have no row: one would be an inserted row."""
        if cur.execute(self.db.sql("SELECT 1 FROM budgets WHERE name = ?"), (name,)).fetchone() is not None:
            raise self._tampered(f"budget {name!r} is in the budgets table but was never created in the log (row inserted)")

    def reserve(self, budget: str, want: int, meter: str = "", conn: int = 0) -> Grant:
        """Debit up to `want` bytes from the budget, as many as fit in the cap and every window."""
        return self.write(lambda cur, head: self._reserve(cur, head, budget, want, meter, conn))

    def _reserve(self, cur: Any, head: Head, budget: str, want: int, meter: str, conn: int) -> Grant:
        if want <= 0:
            raise ValueError("a reservation is for a positive number of bytes")
        b = self._state.budgets.get(budget)
        if b is None:
            self._no_budget_row(cur, budget)
            raise ConfigError(f"no budget {budget!r} in ledger {self.url}")
        self._touch(budget, b)  # a denial checks the row too
        grant, reason = decide_reserve(self._state, budget, want, head.now)
        if grant <= 0:
            self.append(cur, head, "deny", budget=budget, meter=meter, conn=conn, reason=reason)
            return Grant(None, 0, b.reserved, b.cap - b.reserved, reason)
        seq = self.append(cur, head, "reserve", budget=budget, meter=meter, conn=conn, amount=grant, reserved=b.reserved + grant)
        assert self._pending is not None
        self._pending.reservations.append((seq, budget, head.now, grant))
        return Grant(seq, grant, b.reserved, b.cap - b.reserved, reason)

    def release(self, res: int, used: int, meter: str = "") -> int:
        """Settle reservation `res` at `used` bytes and give the rest back; return bytes returned."""
        return self.write(lambda cur, head: self._release(cur, head, res, used, meter))

    def _release(self, cur: Any, head: Head, res: int, used: int, meter: str) -> int:
        r = check_release(self._state, res, used)
        b = self._state.budgets[r.budget]
        self._touch(r.budget, b)
        back = r.amount - used
        assert self._pending is not None
        self._pending.settled.append((used, res, r.budget, r.amount))
        self.append(cur, head, "release", budget=r.budget, meter=meter, res=res, used=used, returned=back, reserved=b.reserved - back)
        return back

    def _settle(self, cur: Any, head: Head, releases: Sequence[tuple[int, int]], budget: str, want: int, meter: str,
                conn: int) -> Grant:
        """Settle each (reservation, used) and, when `want` > 0, reserve the next block (the meter's one
        call, the batch op "settle"). With want == 0 the Grant has no reservation and reports the
        budget's debit after the releases."""
        check_settlement(self._state, releases)  # all valid before any is applied
        for res, used in releases:
            self._release(cur, head, res, used, meter)
        if want > 0:
            return self._reserve(cur, head, budget, want, meter, conn)
        b = self._state.budgets.get(budget)
        if b is None:
            raise ConfigError(f"no budget {budget!r} in ledger {self.url}")
        return Grant(None, 0, b.reserved, b.cap - b.reserved, "")

    def record(self, kind: str, **fields: Any) -> int:
        """Append one event (meter_start, meter_stop, deny, ...); return its sequence number."""
        return self.write(lambda cur, head: self.append(cur, head, kind, **fields))

    def batch(self, ops: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """Run several operations in one transaction (one durable commit).

        Each op is ("reserve", (budget, want, meter, conn)), ("release", (res, used, meter)),
        ("settle", (releases, budget, want, meter, conn)) or ("record", (kind, fields)). A ValueError or ConfigError in one op is returned in its slot;
        a database failure fails the whole batch with LedgerUnavailable.
        """
        run = {"reserve": self._reserve, "release": self._release, "settle": self._settle,
               "record": lambda cur, head, kind, fields: self.append(cur, head, kind, **fields)}

        def body(cur: Any, head: Head) -> list[Any]:
            out: list[Any] = []
            for name, args in ops:
                try:
                    if name not in run:
                        raise ValueError(f"unknown ledger op {name!r}")
                    out.append(run[name](cur, head, *args))
                except (ValueError, ConfigError) as exc:
                    out.append(exc)
            return out

        return self.write(body)

    def add_tree_head(self, head: TreeHead, cur: Any = None) -> None:
        """Store a signed tree head: in the open write transaction `cur`, else in a transaction of its own."""
        if cur is None:
            return self.write(lambda c, _h: self.add_tree_head(head, c))
        cur.execute(self.db.sql("INSERT INTO tree_heads (tree_size, ts, root, key_id, signature) VALUES (?, ?, ?, ?, ?)"),
                    (head.tree_size, head.ts, head.root, head.key_id, head.signature))

    def ping(self, really: bool = False) -> None:
        """Raise LedgerUnavailable (or LedgerTampered) unless a write transaction (`really` writing a row) commits now."""
        self.write(lambda cur, head: really and cur.execute(self.db.sql("UPDATE ledger_head SET last_ts = last_ts WHERE id = 1")))

    def checked_status(self, budget: str) -> BudgetStatus:
        """One budget's totals as the log adds them up (replaying what was appended since, in a read
        snapshot: no lock), after checking its row: LedgerTampered when they differ, never the row's figure."""
        db = self.db
        try:
            db.begin_snapshot()
            db.in_snapshot = True
            cur = Reads(db)
            size, frontier, last_ts, last_leaf = cur.execute(
                db.sql("SELECT tree_size, frontier, last_ts, last_leaf FROM ledger_head WHERE id = 1")).fetchone()
            head = Head(int(size), unpack_frontier(frontier), int(last_ts), bytes(last_leaf), max(int(time.time() * 1e6), int(last_ts)))
            self._catch_up(cur, head)
            row = cur.execute(db.sql("SELECT name, cap_bytes, reserved_bytes, outstanding_bytes, windows FROM budgets WHERE name = ?"),
                              (budget,)).fetchone()
        except db.errors as exc:
            db.broken()
            raise LedgerUnavailable(f"ledger {self.url} cannot be read: {one_line(exc)}") from None
        except BaseException:
            self._stale = True
            raise
        finally:
            db.in_snapshot = False
            with contextlib.suppress(Exception):
                db.end_snapshot()
        if budget not in self._state.budgets:
            raise ConfigError(f"no budget {budget!r} in ledger {self.url}")
        probs = budget_row_problems(self._state, [] if row is None else [(row[0], int(row[1]), int(row[2]), int(row[3]), row[4])], [budget])
        if probs:
            raise self._tampered(probs[0])
        return replayed_status(self._state, budget, head.now, head.tree_size, merkle.frontier_root(head.frontier).hex())


def _fmt_windows(wjson: str) -> str:
    return ", ".join(f"{w.seconds}s={w.limit}" for w in windows_from_json(wjson)) or "none"


__all__ = ["BudgetStatus", "Grant", "Head", "Ledger", "Window", "windows_from_json", "windows_to_json"]
