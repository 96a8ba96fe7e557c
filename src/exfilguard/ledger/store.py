"""Ledger storage: the backend-independent ledger; SQLite (ledger/sqlite.py, one host) and
PostgreSQL (ledger/postgres.py, several meters share one budget) supply the connection.

Every write is one transaction that first locks the single ``ledger_head`` row, so the event
log gets gap-free sequence numbers and a debit is decided and recorded atomically: never
check-then-write. The debit itself is also a conditional UPDATE guarded by a CHECK constraint
(``reserved_bytes <= cap_bytes``), so even a wrong grant could not be committed.

A meter follows the log (``follow_log``): it decides on the replayed totals and sends its
writes at the end of the transaction, each guarded by what the log says the row holds
(``WHERE reserved_bytes = <replayed>``, ...), in one PostgreSQL pipeline; a changed row matches
nothing and the transaction is rolled back with LedgerTampered before anything is granted.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from exfilguard.errors import ConfigError, LedgerTampered, LedgerUnavailable
from exfilguard.ledger import merkle
from exfilguard.ledger.events import GENESIS_PREV, decode_event, encode_event
from exfilguard.ledger.replay import BudgetState, LedgerState, budget_row_problems, reservation_row_problems
from exfilguard.ledger.keys import TreeHead

SCHEMA_VERSION = "1"

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ledger_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        tree_size BIGINT NOT NULL,
        frontier BLOB NOT NULL,
        last_ts BIGINT NOT NULL,
        last_leaf BLOB NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS events (seq BIGINT PRIMARY KEY, entry BLOB NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS budgets (
        name TEXT PRIMARY KEY,
        cap_bytes BIGINT NOT NULL CHECK (cap_bytes >= 0),
        reserved_bytes BIGINT NOT NULL CHECK (reserved_bytes >= 0),
        outstanding_bytes BIGINT NOT NULL CHECK (outstanding_bytes >= 0),
        windows TEXT NOT NULL,
        CHECK (reserved_bytes <= cap_bytes))""",
    """CREATE TABLE IF NOT EXISTS reservations (
        id BIGINT PRIMARY KEY,
        budget TEXT NOT NULL,
        ts BIGINT NOT NULL,
        amount BIGINT NOT NULL CHECK (amount > 0),
        used BIGINT CHECK (used IS NULL OR (used >= 0 AND used <= amount)))""",
    """CREATE INDEX IF NOT EXISTS reservations_budget_ts ON reservations (budget, ts)""",
    """CREATE TABLE IF NOT EXISTS tree_heads (
        tree_size BIGINT NOT NULL,
        ts BIGINT NOT NULL,
        root BLOB NOT NULL,
        key_id TEXT NOT NULL,
        signature BLOB NOT NULL,
        PRIMARY KEY (tree_size, ts, key_id))""",
    # k-of-n budget changes (ledger/approvals.py): each budget's approver set, and every
    # applied request's nonce so that no request is applied twice
    """CREATE TABLE IF NOT EXISTS budget_approvers (
        budget TEXT PRIMARY KEY,
        threshold BIGINT NOT NULL CHECK (threshold >= 1),
        keys TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS applied_requests (
        nonce TEXT PRIMARY KEY,
        budget TEXT NOT NULL,
        seq BIGINT NOT NULL)""",
]


@dataclass(frozen=True)
class Window:
    """A rolling window: at most `limit` bytes reserved in any `seconds`-long interval."""

    seconds: int
    limit: int

    def label(self) -> str:
        return f"{self.seconds}s"


@dataclass(frozen=True)
class BudgetStatus:
    """One budget as the ledger sees it (``ledger status``)."""

    budget: str
    cap_bytes: int
    used_bytes: int
    reserved_bytes: int
    remaining_bytes: int
    outstanding_bytes: int
    tree_size: int
    root: str
    windows: list[dict[str, int]] = field(default_factory=list)
    # Bytes that settled reservations say were forwarded (reserved - outstanding): at rest, what left.
    forwarded_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "cap_bytes": self.cap_bytes,
            "used_bytes": self.used_bytes,
            "reserved_bytes": self.reserved_bytes,
            "remaining_bytes": self.remaining_bytes,
            "forwarded_bytes": self.forwarded_bytes,
            "outstanding_bytes": self.outstanding_bytes,
            "tree_size": self.tree_size,
            "root": self.root,
            "windows": self.windows,
        }


@dataclass(frozen=True)
class Grant:
    """The answer to a reservation: `granted` bytes (0 when denied) under reservation `res`."""

    res: int | None
    granted: int
    reserved_after: int
    remaining: int
    reason: str = ""  # why fewer bytes than asked: "cap" or "window:<seconds>s"


@dataclass
class _Head:
    tree_size: int
    frontier: list[bytes]
    last_ts: int
    last_leaf: bytes
    now: int


@dataclass
class _Pending:
    """The writes of one transaction on a followed ledger, sent together just before its commit.

    Every row written is guarded by what the replayed log says it holds, so a changed row
    makes its statement match nothing; the rowcounts are checked before the commit.
    """

    events: list[tuple[int, bytes]] = field(default_factory=list)
    reservations: list[tuple[int, str, int, int]] = field(default_factory=list)  # id, budget, ts, amount
    settled: list[tuple[int, int, str, int]] = field(default_factory=list)  # used, id, budget, amount
    # budget -> (cap, reserved, outstanding, windows json) the log says its row held at first touch
    budgets: dict[str, tuple[int, int, int, str]] = field(default_factory=dict)


def _grantable(want: int, cap: int, reserved: int, windows: Sequence[Window], usage: Sequence[int]) -> tuple[int, str]:
    """How many of `want` bytes the cap and every window (with `usage` bytes counted in it) allow,
    and what limited the grant ("" when nothing did)."""
    grant, reason = min(want, cap - reserved), "cap" if cap - reserved < want else ""
    for w, used in zip(windows, usage):
        room = max(0, w.limit - used)
        if room < grant:
            grant, reason = room, f"window:{w.label()}"
    return grant, reason


def windows_to_json(windows: Sequence[Window]) -> str:
    return json.dumps(sorted([w.seconds, w.limit] for w in windows), separators=(",", ":"))


def windows_from_json(text: str) -> list[Window]:
    return [Window(int(s), int(n)) for s, n in json.loads(text)]


class Ledger:
    """The durable, append-only ledger of one database; thread-compatible, not thread-safe.

    Write methods run in their own transaction; ``batch`` runs several in one (group commit).
    Database failures surface as LedgerUnavailable: callers fail closed.
    """

    url: str
    dialect: str = ""
    # Set by follow_log(): the accounting replayed from the log, which every debit checks the
    # summary rows against. None for readers (CLI, audit) that do not debit.
    _state: LedgerState | None = None
    _state_stale: bool = False
    _frontier: list[bytes]  # set by follow_log
    _pending: _Pending | None = None  # the open transaction's deferred writes, when following the log
    _trusted: dict[int, bytes]  # set by follow_log
    _last_leaf: bytes = b""

    # -- plumbing the dialects fill in -------------------------------------------------
    def _connect(self) -> None:
        raise NotImplementedError

    def _begin_write(self) -> Any:
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def _rollback(self) -> None:
        raise NotImplementedError

    def _head_sql(self) -> str:
        raise NotImplementedError

    def _head_params(self) -> tuple[Any, ...]:
        return ()

    def _sql(self, sql: str) -> str:
        return sql

    def _pipeline(self) -> contextlib.AbstractContextManager[Any]:
        """Send the statements inside without waiting for each answer (PostgreSQL); errors surface at exit."""
        return contextlib.nullcontext()

    def close(self) -> None:
        raise NotImplementedError

    def _errors(self) -> tuple[type[BaseException], ...]:
        raise NotImplementedError

    # -- transactions ------------------------------------------------------------------
    def _write(self, body: Callable[[Any, _Head], Any]) -> Any:
        """Run body(cursor, head) in one write transaction holding the head lock; commit durably."""
        try:
            cur = self._begin_write()
            try:
                row = cur.execute(self._sql(self._head_sql()), self._head_params()).fetchone()
                if row is None:
                    raise LedgerUnavailable(f"ledger {self.url} has no head row; it is not an exfilguard ledger")
                size, frontier, last_ts, last_leaf, now = row
                frontier = bytes(frontier)
                head = _Head(
                    int(size),
                    [frontier[i : i + 32] for i in range(0, len(frontier), 32)],
                    int(last_ts),
                    bytes(last_leaf),
                    max(int(now), int(last_ts)),
                )
                if self._state is not None:
                    self._catch_up(cur, head)
                    self._pending = _Pending()
                start_size = head.tree_size
                result = body(cur, head)
                if head.tree_size != start_size or (self._pending is not None and self._pending.budgets):
                    # one round trip for all of it; each guarded write's rowcount is checked after
                    with self._pipeline():
                        checks = self._flush(cur)
                        cur.execute(
                            self._sql("UPDATE ledger_head SET tree_size = ?, frontier = ?, last_ts = ?, last_leaf = ? WHERE id = 1"),
                            (head.tree_size, b"".join(head.frontier), head.last_ts, head.last_leaf),
                        )
                    self._check_flushed(cur, checks)
                self._commit()
                return result
            except BaseException:
                # The replayed state may hold events this transaction appended: replay again.
                self._state_stale = True
                try:
                    self._rollback()
                except Exception:
                    pass
                raise
            finally:
                self._pending = None
        except self._errors() as exc:
            self._broken()
            raise LedgerUnavailable(f"ledger {self.url} cannot be written: {_one_line(exc)}") from None

    def _flush(self, cur: Any) -> list[tuple[Any, Any, int]]:
        """Send the transaction's deferred writes; return (what, cursor, rowcount wanted) to check."""
        p = self._pending
        if p is None:
            return []
        if p.events:
            cur.executemany(self._sql("INSERT INTO events (seq, entry) VALUES (?, ?)"), p.events)
        if p.reservations:
            cur.executemany(
                self._sql("INSERT INTO reservations (id, budget, ts, amount, used) VALUES (?, ?, ?, ?, NULL)"), p.reservations
            )
        checks: list[tuple[Any, Any, int]] = []
        if p.settled:
            # one cursor per checked statement: in pipeline mode a cursor keeps only its last result
            c = cur.connection.cursor()
            c.executemany(
                self._sql("UPDATE reservations SET used = ? WHERE id = ? AND budget = ? AND amount = ? AND used IS NULL"),
                p.settled,
            )
            checks.append((None, c, len(p.settled)))
        assert self._state is not None
        for name, (cap, reserved, outstanding, wjson) in p.budgets.items():
            b = self._state.budgets[name]
            c = cur.connection.cursor()
            c.execute(
                self._sql(
                    "UPDATE budgets SET reserved_bytes = ?, outstanding_bytes = ? WHERE name = ? AND cap_bytes = ? "
                    "AND reserved_bytes = ? AND outstanding_bytes = ? AND windows = ?"
                ),
                (b.reserved, b.outstanding, name, cap, reserved, outstanding, wjson),
            )
            checks.append((name, c, 1))
        return checks

    def _check_flushed(self, cur: Any, checks: list[tuple[Any, Any, int]]) -> None:
        """Raise LedgerTampered unless every guarded write matched its row: a changed row matches nothing."""
        p = self._pending
        for name, c, want in checks:
            if c.rowcount == want:
                continue
            assert p is not None
            if name is None:  # which reservation? (the ones that matched hold their new `used` now)
                for used, res, budget, amount in p.settled:
                    row = cur.execute(self._sql("SELECT budget, amount, used FROM reservations WHERE id = ?"), (res,)).fetchone()
                    if row is None:
                        raise self._tampered(f"reservation {res} is in the log but not in the reservations table (row deleted)")
                    if (row[0], int(row[1]), row[2]) != (budget, amount, used):
                        raise self._tampered(f"reservation {res} row differs from the log (row changed)")
                raise self._tampered("a reservations row differs from the log (row changed)")
            cap, reserved, outstanding, wjson = p.budgets[name]
            row = cur.execute(
                self._sql("SELECT name, cap_bytes, reserved_bytes, outstanding_bytes, windows FROM budgets WHERE name = ?"), (name,)
            ).fetchone()
            was = LedgerState(budgets={name: BudgetState(cap, [tuple(w) for w in json.loads(wjson)], reserved, outstanding)})
            rows = [] if row is None else [(row[0], int(row[1]), int(row[2]), int(row[3]), row[4])]
            probs = budget_row_problems(was, rows, [name])
            raise self._tampered(probs[0] if probs else f"budget {name!r} row's windows are not as the log wrote them (row changed)")

    def _touch(self, name: str, b: BudgetState) -> None:
        """Guard the budget's row by what the log says it holds now (once per transaction)."""
        p = self._pending
        assert p is not None
        if name not in p.budgets:
            wjson = windows_to_json([Window(s, n) for s, n in b.windows])
            p.budgets[name] = (b.cap, b.reserved, b.outstanding, wjson)

    def _broken(self) -> None:
        """Forget a connection that failed; the next call reconnects."""

    def _append(self, cur: Any, head: _Head, kind: str, **fields: Any) -> int:
        seq = head.tree_size
        event = {"v": 1, "seq": seq, "ts": head.now, "kind": kind, "prev": head.last_leaf.hex() if seq else GENESIS_PREV}
        event.update(fields)
        entry = encode_event(event)
        if self._pending is not None:
            self._pending.events.append((seq, entry))
        else:
            cur.execute(self._sql("INSERT INTO events (seq, entry) VALUES (?, ?)"), (seq, entry))
        lh = merkle.leaf_hash(entry)
        head.frontier = merkle.frontier_append(head.frontier, seq, lh)
        head.tree_size = seq + 1
        head.last_leaf = lh
        head.last_ts = head.now
        if self._state is not None:
            self._state.apply(event)
            self._frontier, self._last_leaf = head.frontier, lh
            if self._state.problems:  # our own event does not add up: a tampered row slipped past
                raise LedgerTampered(f"ledger {self.url}: {self._state.problems[0]}")
        return seq

    # -- the log is the ledger: replay it, and follow it ---------------------------------
    def follow_log(self, trusted: Sequence[TreeHead] = ()) -> LedgerState:
        """Replay the whole log now and keep following it; raise LedgerTampered when it does not add up.

        Checks the hash chain, that the head row's root is the root of the entries, and that the
        ``budgets`` and ``reservations`` rows are what the log implies. Afterwards every write
        first replays the events other meters appended (checking chain and root again), and
        every debit and settlement is checked against the replayed totals, not the rows.
        `trusted` heads (kept outside the ledger) must be prefixes of the log: a rolled-back or
        rewritten ledger is refused.
        """
        self._trusted = {h.tree_size: h.root for h in trusted}
        self._state = LedgerState()
        self._state_stale = True
        self._write(lambda cur, head: None)
        return self._state

    def _tampered(self, msg: str) -> LedgerTampered:
        return LedgerTampered(
            f"ledger {self.url} does not add up, refusing to use it: {msg}; "
            "`exfilguard ledger verify` shows every problem"
        )

    def _catch_up(self, cur: Any, head: _Head) -> None:
        """Replay the entries appended since we last looked (all of them when stale); check the head."""
        full = self._state_stale
        if full:
            self._state, self._frontier, self._last_leaf = LedgerState(), [], b""
        st = self._state
        assert st is not None
        if head.tree_size < st.size:
            raise self._tampered(
                f"it holds {head.tree_size} entries but {st.size} were seen before: entries were deleted (rolled back)"
            )
        seq = st.size
        while seq < head.tree_size:
            rows = cur.execute(
                self._sql("SELECT seq, entry FROM events WHERE seq >= ? ORDER BY seq LIMIT 5000"), (seq,)
            ).fetchall()
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
                want_prev = GENESIS_PREV if seq == 0 else self._last_leaf.hex()
                if ev["seq"] != seq or ev["prev"] != want_prev:
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
            extra = cur.execute(self._sql("SELECT COUNT(*) FROM events WHERE seq >= ?"), (seq,)).fetchone()[0]
            if int(extra):
                raise self._tampered(f"{int(extra)} entries lie beyond the head row's {seq} (inserted, or the head row was rolled back)")
            brows = [(r[0], int(r[1]), int(r[2]), int(r[3]), r[4]) for r in cur.execute(self._sql(
                "SELECT name, cap_bytes, reserved_bytes, outstanding_bytes, windows FROM budgets ORDER BY name")).fetchall()]
            rrows = [(int(a), b, int(c), int(d), None if e is None else int(e)) for a, b, c, d, e in cur.execute(
                self._sql("SELECT id, budget, ts, amount, used FROM reservations ORDER BY id")).fetchall()]
            probs = budget_row_problems(st, brows) + reservation_row_problems(st, rrows)
            if probs:
                raise self._tampered(probs[0] + (f" (and {len(probs) - 1} more)" if len(probs) > 1 else ""))
        self._state_stale = False

    def _check_budget_row(self, name: str, row: tuple[str, int, int, int, str]) -> None:
        """With a replayed log, refuse a budgets row that is not what the log adds up to."""
        if self._state is None:
            return
        probs = budget_row_problems(self._state, [row], [name])
        if probs:
            raise self._tampered(probs[0])

    # -- schema ------------------------------------------------------------------------
    def _init_schema(self) -> None:
        def body() -> None:
            cur = self._begin_write()
            try:
                if self.dialect == "postgresql":
                    cur.execute("SELECT pg_advisory_xact_lock(7270011)")
                for stmt in _SCHEMA:
                    cur.execute(self._ddl(stmt))
                cur.execute(
                    self._sql("INSERT INTO ledger_meta (key, value) VALUES ('schema', ?) ON CONFLICT (key) DO NOTHING"),
                    (SCHEMA_VERSION,),
                )
                cur.execute(
                    self._sql(
                        "INSERT INTO ledger_head (id, tree_size, frontier, last_ts, last_leaf) VALUES (1, 0, ?, 0, ?) "
                        "ON CONFLICT (id) DO NOTHING"
                    ),
                    (b"", bytes(32)),
                )
                version = cur.execute(self._sql("SELECT value FROM ledger_meta WHERE key = 'schema'")).fetchone()[0]
                self._commit()
            except BaseException:
                try:
                    self._rollback()
                except Exception:
                    pass
                raise
            if version != SCHEMA_VERSION:
                raise ConfigError(f"ledger {self.url} has schema {version}, this exfilguard speaks {SCHEMA_VERSION}")

        try:
            body()
        except self._errors() as exc:
            raise LedgerUnavailable(f"ledger {self.url} cannot be initialised: {_one_line(exc)}") from None

    def _ddl(self, stmt: str) -> str:
        return stmt

    # -- write operations ----------------------------------------------------------------
    def ensure_budget(self, name: str, cap: int, windows: Sequence[Window] = ()) -> BudgetStatus:
        """Create the budget with this cap and windows, or check that the stored one matches.

        A different cap or window set is refused with ConfigError: raising a cap is a signed
        k-of-n operation, never a command-line flag.
        """
        if cap < 0:
            raise ConfigError("a cap must be a non-negative number of bytes")
        wjson = windows_to_json(windows)

        def body(cur: Any, head: _Head) -> None:
            row = cur.execute(
                self._sql("SELECT cap_bytes, windows, reserved_bytes, outstanding_bytes FROM budgets WHERE name = ?"), (name,)
            ).fetchone()
            if self._state is not None and (row is not None or name in self._state.budgets):
                if row is None:
                    raise self._tampered(f"budget {name!r} is in the log but not in the budgets table (row deleted)")
                self._check_budget_row(name, (name, int(row[0]), int(row[2]), int(row[3]), row[1]))
            if row is None:
                cur.execute(
                    self._sql(
                        "INSERT INTO budgets (name, cap_bytes, reserved_bytes, outstanding_bytes, windows) VALUES (?, ?, 0, 0, ?)"
                    ),
                    (name, cap, wjson),
                )
                self._append(cur, head, "budget_created", budget=name, cap=cap, windows=json.loads(wjson))
                return
            stored_cap, stored_w = int(row[0]), row[1]
            if stored_cap != cap:
                raise ConfigError(
                    f"budget {name!r} exists with cap {stored_cap} bytes; refusing to start with --cap {cap}: "
                    f"a cap is changed only by a signed k-of-n cap change, never a flag (start with --cap {stored_cap})"
                )
            if stored_w != wjson:
                raise ConfigError(
                    f"budget {name!r} exists with windows {_fmt_windows(stored_w)}; refusing to start with "
                    f"{_fmt_windows(wjson)}: windows are part of the budget (start with the stored ones)"
                )

        self._write(body)
        return self.status(name)

    def reserve(self, budget: str, want: int, meter: str = "", conn: int = 0) -> Grant:
        """Debit up to `want` bytes from the budget, as many as fit in the cap and every window."""
        return self._write(lambda cur, head: self._reserve(cur, head, budget, want, meter, conn))

    def _reserve(self, cur: Any, head: _Head, budget: str, want: int, meter: str, conn: int) -> Grant:
        if want <= 0:
            raise ValueError("a reservation is for a positive number of bytes")
        b = self._state.budgets.get(budget) if self._pending is not None and self._state is not None else None
        if b is not None:
            return self._reserve_followed(head, b, budget, want, meter, conn)
        # Not following the log, or a budget the log does not have (which the row check refuses).
        row = cur.execute(
            self._sql("SELECT cap_bytes, reserved_bytes, windows, outstanding_bytes FROM budgets WHERE name = ?" + self._lock_row()),
            (budget,),
        ).fetchone()
        if row is None:
            if self._state is not None and budget in self._state.budgets:
                raise self._tampered(f"budget {budget!r} is in the log but not in the budgets table (row deleted)")
            raise ConfigError(f"no budget {budget!r} in ledger {self.url}")
        cap, reserved, wjson = int(row[0]), int(row[1]), row[2]
        # With a replayed log the row must be what the log adds up to: a lowered reserved_bytes
        # would otherwise lend bytes that already left.
        self._check_budget_row(budget, (budget, cap, reserved, int(row[3]), wjson))
        windows = windows_from_json(wjson)
        if self._state is not None:
            usage = self._state.window_used(budget, head.now)
        else:
            usage = [self._window_usage(cur, budget, head.now - w.seconds * 1_000_000) for w in windows]
        grant, reason = _grantable(want, cap, reserved, windows, usage)
        if grant <= 0:
            self._append(cur, head, "deny", budget=budget, meter=meter, conn=conn, reason=reason)
            return Grant(None, 0, reserved, cap - reserved, reason)
        n = cur.execute(
            self._sql(
                "UPDATE budgets SET reserved_bytes = reserved_bytes + ?, outstanding_bytes = outstanding_bytes + ? "
                "WHERE name = ? AND reserved_bytes + ? <= cap_bytes"
            ),
            (grant, grant, budget, grant),
        ).rowcount
        if n != 1:  # cannot happen under the head lock; never forward on it
            raise LedgerUnavailable(f"conditional debit of budget {budget!r} did not apply")
        after = reserved + grant
        seq = self._append(cur, head, "reserve", budget=budget, meter=meter, conn=conn, amount=grant, reserved=after)
        cur.execute(
            self._sql("INSERT INTO reservations (id, budget, ts, amount, used) VALUES (?, ?, ?, ?, NULL)"),
            (seq, budget, head.now, grant),
        )
        return Grant(seq, grant, after, cap - after, reason)

    def _reserve_followed(self, head: _Head, b: BudgetState, budget: str, want: int, meter: str, conn: int) -> Grant:
        """_reserve decided on the replayed log; the row is checked against it when the writes are flushed."""
        assert self._state is not None and self._pending is not None
        self._touch(budget, b)  # a denial checks the row too
        cap, reserved = b.cap, b.reserved
        windows = [Window(secs, limit) for secs, limit in b.windows]
        grant, reason = _grantable(want, cap, reserved, windows, self._state.window_used(budget, head.now))
        if grant <= 0:
            self._append(None, head, "deny", budget=budget, meter=meter, conn=conn, reason=reason)
            return Grant(None, 0, reserved, cap - reserved, reason)
        after = reserved + grant
        seq = self._append(None, head, "reserve", budget=budget, meter=meter, conn=conn, amount=grant, reserved=after)
        self._pending.reservations.append((seq, budget, head.now, grant))
        return Grant(seq, grant, after, cap - after, reason)

    def _window_usage(self, cur: Any, budget: str, since: int) -> int:
        row = cur.execute(
            self._sql("SELECT COALESCE(SUM(COALESCE(used, amount)), 0) FROM reservations WHERE budget = ? AND ts > ?"),
            (budget, since),
        ).fetchone()
        return int(row[0])

    def _lock_row(self) -> str:
        return ""

    def release(self, res: int, used: int, meter: str = "") -> int:
        """Settle reservation `res` at `used` bytes and give the rest back; return bytes returned."""
        return self._write(lambda cur, head: self._release(cur, head, res, used, meter))

    def _release(self, cur: Any, head: _Head, res: int, used: int, meter: str) -> int:
        if self._pending is not None and self._state is not None:
            r = self._state.reservations.get(res)
            b = None if r is None or r.used is not None else self._state.budgets.get(r.budget)
            if r is not None and b is not None:
                return self._release_followed(head, b, r, res, used, meter)
        # Not following the log, or a reservation the log does not have open: the row says why
        # (with a replayed log this path raises before it writes).
        row = cur.execute(self._sql("SELECT budget, amount, used FROM reservations WHERE id = ?"), (res,)).fetchone()
        if row is None:
            if self._state is not None and res in self._state.reservations:
                raise self._tampered(f"reservation {res} is in the log but not in the reservations table (row deleted)")
            raise ValueError(f"no reservation {res}")
        budget, amount, prior = row[0], int(row[1]), row[2]
        if self._state is not None:
            r = self._state.reservations.get(res)
            if r is None or (r.budget, r.amount, r.used) != (budget, amount, None if prior is None else int(prior)):
                raise self._tampered(f"reservation {res} row differs from the log (row changed)")
        if prior is not None:
            raise ValueError(f"reservation {res} is already settled")
        if not 0 <= used <= amount:
            raise ValueError(f"reservation {res} of {amount} bytes cannot settle at {used}")
        back = amount - used
        cur.execute(self._sql("UPDATE reservations SET used = ? WHERE id = ?"), (used, res))
        cur.execute(
            self._sql(
                "UPDATE budgets SET reserved_bytes = reserved_bytes - ?, outstanding_bytes = outstanding_bytes - ? WHERE name = ?"
            ),
            (back, amount, budget),
        )
        after = int(cur.execute(self._sql("SELECT reserved_bytes FROM budgets WHERE name = ?"), (budget,)).fetchone()[0])
        self._append(cur, head, "release", budget=budget, meter=meter, res=res, used=used, returned=back, reserved=after)
        return back

    def _release_followed(self, head: _Head, b: BudgetState, r: Any, res: int, used: int, meter: str) -> int:
        """_release decided on the replayed log; its rows are checked against it when the writes are flushed."""
        assert self._pending is not None
        if not 0 <= used <= r.amount:
            raise ValueError(f"reservation {res} of {r.amount} bytes cannot settle at {used}")
        self._touch(r.budget, b)
        back = r.amount - used
        self._pending.settled.append((used, res, r.budget, r.amount))
        self._append(None, head, "release", budget=r.budget, meter=meter, res=res, used=used, returned=back,
                     reserved=b.reserved - back)
        return back

    def settle(
        self, releases: Sequence[tuple[int, int]], budget: str, want: int = 0, meter: str = "", conn: int = 0
    ) -> Grant:
        """Settle each (reservation, used) and, when `want` > 0, reserve the next block: one transaction.

        With want == 0 the Grant has no reservation and reports the budget's debit after the releases.
        """
        return self._write(lambda cur, head: self._settle(cur, head, releases, budget, want, meter, conn))

    def _settle(
        self, cur: Any, head: _Head, releases: Sequence[tuple[int, int]], budget: str, want: int, meter: str, conn: int
    ) -> Grant:
        # Validate every release before applying any, so that a bad one leaves the transaction
        # untouched (a single release validates itself before it writes).
        if len({res for res, _ in releases}) != len(releases):
            raise ValueError("a reservation appears twice in one settlement")
        st = self._state if self._pending is not None else None
        for res, used in releases if len(releases) > 1 else ():
            r = None if st is None else st.reservations.get(res)
            if r is not None:  # the log says; its row is checked when it is written
                row = (r.amount, r.used)
            else:
                row = cur.execute(self._sql("SELECT amount, used FROM reservations WHERE id = ?"), (res,)).fetchone()
            if row is None or row[1] is not None or not 0 <= used <= int(row[0]):
                raise ValueError(f"reservation {res} cannot settle at {used} bytes")
        for res, used in releases:
            self._release(cur, head, res, used, meter)
        if want > 0:
            return self._reserve(cur, head, budget, want, meter, conn)
        b = None if st is None else st.budgets.get(budget)
        if b is not None:
            return Grant(None, 0, b.reserved, b.cap - b.reserved, "")
        row = cur.execute(self._sql("SELECT cap_bytes, reserved_bytes FROM budgets WHERE name = ?"), (budget,)).fetchone()
        if row is None:
            raise ConfigError(f"no budget {budget!r} in ledger {self.url}")
        return Grant(None, 0, int(row[1]), int(row[0]) - int(row[1]), "")

    def record(self, kind: str, **fields: Any) -> int:
        """Append one event (meter_start, meter_stop, deny, ...); return its sequence number."""
        return self._write(lambda cur, head: self._append(cur, head, kind, **fields))

    def batch(self, ops: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """Run several operations in one transaction (one durable commit).

        Each op is ("reserve", (budget, want, meter, conn)), ("release", (res, used, meter)),
        ("renew", (res, used, budget, want, meter, conn)), ("settle", (releases, budget, want, meter, conn))
        or ("record", (kind, fields)). A ValueError in one op is returned in its slot; a database
        failure fails the whole batch with LedgerUnavailable.
        """

        def body(cur: Any, head: _Head) -> list[Any]:
            out: list[Any] = []
            for name, args in ops:
                try:
                    if name == "reserve":
                        out.append(self._reserve(cur, head, *args))
                    elif name == "release":
                        out.append(self._release(cur, head, *args))
                    elif name == "renew":  # settle a used-up reservation and take the next, one commit
                        prev, used, budget, want, meter, conn = args
                        self._release(cur, head, prev, used, meter)
                        out.append(self._reserve(cur, head, budget, want, meter, conn))
                    elif name == "settle":
                        out.append(self._settle(cur, head, *args))
                    elif name == "record":
                        out.append(self._append(cur, head, args[0], **args[1]))
                    else:
                        raise ValueError(f"unknown ledger op {name!r}")
                except (ValueError, ConfigError) as exc:
                    out.append(exc)
            return out

        return self._write(body)

    def add_tree_head(self, head: TreeHead) -> None:
        """Store a signed tree head."""

        def body(cur: Any, _h: _Head) -> None:
            cur.execute(
                self._sql("INSERT INTO tree_heads (tree_size, ts, root, key_id, signature) VALUES (?, ?, ?, ?, ?)"),
                (head.tree_size, head.ts, head.root, head.key_id, head.signature),
            )

        self._write(body)

    def ping(self) -> None:
        """Raise LedgerUnavailable unless a write transaction can be opened right now."""
        self._write(lambda cur, head: None)

    # -- k-of-n budget changes: ledger/approvals.py checks the signatures; these apply them
    # -- atomically, re-checking under the head lock everything the signatures were counted against
    def init_approvers(self, budget: str, threshold: int, keys: Sequence[str]) -> int:
        """Set a budget's first approver set (hex raw public keys); refuse once it has one."""
        keys = sorted(keys)

        def body(cur: Any, head: _Head) -> int:
            if cur.execute(self._sql("SELECT 1 FROM budgets WHERE name = ?" + self._lock_row()), (budget,)).fetchone() is None:
                raise ConfigError(f"no budget {budget!r} in ledger {self.url}; give --cap to create it")
            if cur.execute(self._sql("SELECT 1 FROM budget_approvers WHERE budget = ?"), (budget,)).fetchone() is not None:
                raise ConfigError(
                    f"budget {budget!r} already has approvers; changing them is itself a k-of-n change "
                    "(`exfilguard budget request --approvers ... --threshold K`)"
                )
            cur.execute(
                self._sql("INSERT INTO budget_approvers (budget, threshold, keys) VALUES (?, ?, ?)"),
                (budget, threshold, json.dumps(keys, separators=(",", ":"))),
            )
            return self._append(cur, head, "approvers_set", budget=budget, threshold=threshold, keys=keys, approvals=[], request=None)

        return self._write(body)

    def apply_budget_change(
        self,
        budget: str,
        *,
        nonce: str,
        expires: int,
        approvers: tuple[int, Sequence[str]],
        approvals: list[dict[str, str]],
        request: dict[str, Any],
        old_cap: int | None = None,
        new_cap: int | None = None,
        new_approvers: tuple[int, Sequence[str]] | None = None,
    ) -> int:
        """Apply an approved cap change (old_cap -> new_cap) or approver-set change; return its seq.

        In one transaction: refuses a nonce applied before (RequestReplayed), a request past
        `expires` by the ledger's clock (RequestExpired), a budget whose approver set is not
        `approvers` or whose cap is not `old_cap` any more (RequestStale), and a cap below the
        bytes already reserved (ApprovalRefused): the new cap must hold what already left.
        """
        from exfilguard.errors import ApprovalRefused, RequestExpired, RequestReplayed, RequestStale, WrongBudget

        def body(cur: Any, head: _Head) -> int:
            row = cur.execute(self._sql("SELECT seq FROM applied_requests WHERE nonce = ?"), (nonce,)).fetchone()
            if row is not None:
                raise RequestReplayed(f"request {nonce} was applied already (ledger entry {int(row[0])}); make a new request")
            if head.now > expires:
                raise RequestExpired(
                    f"request {nonce} expired at {_iso(expires)} (ledger time {_iso(head.now)}); make a new request"
                )
            brow = cur.execute(
                self._sql("SELECT cap_bytes, reserved_bytes FROM budgets WHERE name = ?" + self._lock_row()), (budget,)
            ).fetchone()
            if brow is None:
                raise WrongBudget(f"no budget {budget!r} in ledger {self.url}: the request is for another ledger")
            cap, reserved = int(brow[0]), int(brow[1])
            arow = cur.execute(self._sql("SELECT threshold, keys FROM budget_approvers WHERE budget = ?"), (budget,)).fetchone()
            if arow is None:
                raise ApprovalRefused(f"budget {budget!r} has no approvers; set them once with `exfilguard budget init`")
            if (int(arow[0]), json.loads(arow[1])) != (approvers[0], sorted(approvers[1])):
                raise RequestStale(f"the approver set of budget {budget!r} changed since the request was made; make a new request")
            if new_approvers is None:
                if old_cap is None or new_cap is None:
                    raise ValueError("a cap change needs old_cap and new_cap")
                if cap != old_cap:
                    raise RequestStale(
                        f"budget {budget!r} has cap {cap} bytes now; the request was made when it was {old_cap}: make a new request"
                    )
                if new_cap < reserved:
                    raise ApprovalRefused(
                        f"cannot lower the cap of budget {budget!r} to {new_cap} bytes: {reserved} bytes are already "
                        f"reserved; request a cap of at least {reserved}"
                    )
                cur.execute(self._sql("UPDATE budgets SET cap_bytes = ? WHERE name = ?"), (new_cap, budget))
                seq = self._append(cur, head, "cap_change", budget=budget, old_cap=old_cap, new_cap=new_cap,
                                   approvals=approvals, request=request)
            else:
                keys = sorted(new_approvers[1])
                cur.execute(
                    self._sql("UPDATE budget_approvers SET threshold = ?, keys = ? WHERE budget = ?"),
                    (new_approvers[0], json.dumps(keys, separators=(",", ":")), budget),
                )
                seq = self._append(cur, head, "approvers_set", budget=budget, threshold=new_approvers[0], keys=keys,
                                   approvals=approvals, request=request)
            cur.execute(self._sql("INSERT INTO applied_requests (nonce, budget, seq) VALUES (?, ?, ?)"), (nonce, budget, seq))
            return seq

        return self._write(body)

    # -- reads -------------------------------------------------------------------------
    _snapshot_depth: int = 0

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Make the reads inside see one consistent state, while meters keep appending meanwhile."""
        if self._snapshot_depth:
            yield
            return
        try:
            self._begin_snapshot()
        except self._errors() as exc:
            self._broken()
            raise LedgerUnavailable(f"ledger {self.url} cannot be read: {_one_line(exc)}") from None
        self._snapshot_depth = 1
        try:
            yield
        finally:
            self._snapshot_depth = 0
            with contextlib.suppress(Exception):
                self._end_snapshot()

    def _begin_snapshot(self) -> None:
        raise NotImplementedError

    def _end_snapshot(self) -> None:
        raise NotImplementedError

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            rows = self._read_rows(self._sql(sql), params)
        except self._errors() as exc:
            self._broken()
            raise LedgerUnavailable(f"ledger {self.url} cannot be read: {_one_line(exc)}") from None
        return rows

    def _read_rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def tree_head(self) -> TreeHead:
        """Return the current (unsigned) tree head: size, last timestamp and root."""
        rows = self._read("SELECT tree_size, frontier, last_ts FROM ledger_head WHERE id = 1")
        if not rows:
            raise LedgerUnavailable(f"ledger {self.url} has no head row")
        size, frontier, ts = rows[0]
        frontier = bytes(frontier)
        root = merkle.frontier_root([frontier[i : i + 32] for i in range(0, len(frontier), 32)])
        return TreeHead(int(size), int(ts), root)

    def budgets(self) -> list[str]:
        """Return the names of all budgets."""
        return [r[0] for r in self._read("SELECT name FROM budgets ORDER BY name")]

    def status(self, budget: str | None = None) -> BudgetStatus:
        """Return one budget's totals (the only budget when `budget` is None)."""
        names = self.budgets()
        if budget is None:
            if len(names) != 1:
                raise ConfigError(
                    f"ledger {self.url} holds {len(names)} budgets ({', '.join(names) or 'none'}); name one with --budget"
                )
            budget = names[0]
        rows = self._read(
            "SELECT cap_bytes, reserved_bytes, outstanding_bytes, windows FROM budgets WHERE name = ?", (budget,)
        )
        if not rows:
            raise ConfigError(f"no budget {budget!r} in ledger {self.url} (it has: {', '.join(names) or 'none'})")
        cap, reserved, outstanding, wjson = rows[0]
        head = self.tree_head()
        now = max(int(time.time() * 1_000_000), head.ts)
        wins = []
        for w in windows_from_json(wjson):
            used = int(
                self._read(
                    "SELECT COALESCE(SUM(COALESCE(used, amount)), 0) FROM reservations WHERE budget = ? AND ts > ?",
                    (budget, now - w.seconds * 1_000_000),
                )[0][0]
            )
            wins.append({"seconds": w.seconds, "limit_bytes": w.limit, "used_bytes": used, "remaining_bytes": max(0, w.limit - used)})
        return BudgetStatus(
            budget=budget,
            cap_bytes=int(cap),
            used_bytes=int(reserved),
            reserved_bytes=int(reserved),
            remaining_bytes=int(cap) - int(reserved),
            outstanding_bytes=int(outstanding),
            tree_size=head.tree_size,
            root=head.root.hex(),
            windows=wins,
            forwarded_bytes=int(reserved) - int(outstanding),
        )

    def entries(self, start: int = 0, chunk: int = 5000) -> Iterator[tuple[int, bytes]]:
        """Yield (seq, entry bytes) in seq order."""
        last = start - 1
        while True:
            rows = self._read("SELECT seq, entry FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (last, chunk))
            if not rows:
                return
            for seq, entry in rows:
                yield int(seq), bytes(entry)
            last = int(rows[-1][0])

    def tree_heads(self) -> list[TreeHead]:
        """Return every stored signed tree head, oldest first."""
        rows = self._read("SELECT tree_size, ts, root, key_id, signature FROM tree_heads ORDER BY ts, tree_size")
        return [TreeHead(int(a), int(b), bytes(c), d, bytes(e)) for a, b, c, d, e in rows]

    def head_row(self) -> tuple[int, list[bytes], int, bytes]:
        """Return the stored head row: (tree_size, frontier, last_ts, last_leaf)."""
        size, frontier, ts, last = self._read("SELECT tree_size, frontier, last_ts, last_leaf FROM ledger_head WHERE id = 1")[0]
        frontier = bytes(frontier)
        return int(size), [frontier[i : i + 32] for i in range(0, len(frontier), 32)], int(ts), bytes(last)

    def budget_rows(self) -> list[tuple[str, int, int, int, str]]:
        """Return (name, cap, reserved, outstanding, windows json) for every budget."""
        return [(r[0], int(r[1]), int(r[2]), int(r[3]), r[4]) for r in self._read(
            "SELECT name, cap_bytes, reserved_bytes, outstanding_bytes, windows FROM budgets ORDER BY name")]

    def reservation_rows(self) -> list[tuple[int, str, int, int, int | None]]:
        """Return (id, budget, ts, amount, used) for every reservation."""
        return [(int(a), b, int(c), int(d), None if e is None else int(e)) for a, b, c, d, e in self._read(
            "SELECT id, budget, ts, amount, used FROM reservations ORDER BY id")]

    def approver_set(self, budget: str) -> tuple[int, list[str]] | None:
        """Return a budget's (threshold, sorted hex public keys), or None when it has none yet."""
        rows = self._read("SELECT threshold, keys FROM budget_approvers WHERE budget = ?", (budget,))
        return (int(rows[0][0]), list(json.loads(rows[0][1]))) if rows else None

    def approver_rows(self) -> list[tuple[str, int, list[str]]]:
        """Return (budget, threshold, keys) for every budget that has approvers."""
        return [(r[0], int(r[1]), list(json.loads(r[2]))) for r in self._read(
            "SELECT budget, threshold, keys FROM budget_approvers ORDER BY budget")]

    def applied_request_rows(self) -> list[tuple[str, str, int]]:
        """Return (nonce, budget, seq) for every applied budget change request."""
        return [(r[0], r[1], int(r[2])) for r in self._read("SELECT nonce, budget, seq FROM applied_requests ORDER BY seq")]

    def applied_request(self, nonce: str) -> int | None:
        """Return the ledger entry that applied the request with this nonce, or None."""
        rows = self._read("SELECT seq FROM applied_requests WHERE nonce = ?", (nonce,))
        return int(rows[0][0]) if rows else None


def _iso(ts_us: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts_us / 1e6, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def _fmt_windows(wjson: str) -> str:
    ws = windows_from_json(wjson)
    return ", ".join(f"{w.seconds}s={w.limit}" for w in ws) or "none"


def open_ledger(url: str, *, create: bool = True) -> Ledger:
    """Open (and with `create`, initialise) the ledger at `url`.

    ``sqlite:///PATH`` (a relative path after the third slash, an absolute one after a fourth)
    or ``postgresql://user@host:port/db``. Raises ConfigError for a URL it cannot use and
    LedgerUnavailable when the database cannot be reached.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"ledger URL {url!r} is not a URL; use sqlite:///PATH or postgresql://HOST/DB")
    scheme = url.split("://", 1)[0].lower()
    if scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError(f"ledger URL {url!r} has no file path; use sqlite:///relative.db or sqlite:////abs/path.db")
        from exfilguard.ledger.sqlite import SQLiteLedger

        return SQLiteLedger(url, path, create=create)
    if scheme in ("postgresql", "postgres"):
        if not urlparse(url).hostname and "host=" not in url:
            raise ConfigError(f"ledger URL {_redact(url)!r} names no host")
        from exfilguard.ledger.postgres import PostgresLedger

        return PostgresLedger(url, create=create)
    raise ConfigError(f"unknown ledger URL scheme {scheme!r} in {_redact(url)!r}; use sqlite:///PATH or postgresql://...")
