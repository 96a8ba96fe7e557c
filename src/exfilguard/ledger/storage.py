"""What the log needs from a database, and the tables it keeps there.

``Storage`` is the small interface the SQLite (sqlite.py) and PostgreSQL (postgres.py) backends
implement: one connection, write transactions that start by locking the single ``ledger_head``
row (so the log gets gap-free sequence numbers), reads, and the SQL dialect. The log, the
accounting and every decision live above it (store.py); a backend decides nothing.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from typing import Any

from exfilguard.base_errors import ConfigError, LedgerUnavailable

SCHEMA_VERSION = "1"

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ledger_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        tree_size BIGINT NOT NULL,
        frontier BLOB NOT NULL,
        last_ts BIGINT NOT NULL,
        last_leaf BLOB NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS events (seq BIGINT PRIMARY KEY, entry BLOB NOT NULL)""",
    # budgets and reservations are a cache of the log (the meter checks them against its replay);
    # the CHECK constraints back the grant decided on the log
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
    # k-of-n budget changes (approvals.py): each budget's approver set, and every applied
    # request's nonce so that no request is applied twice
    """CREATE TABLE IF NOT EXISTS budget_approvers (
        budget TEXT PRIMARY KEY,
        threshold BIGINT NOT NULL CHECK (threshold >= 1),
        keys TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS applied_requests (
        nonce TEXT PRIMARY KEY,
        budget TEXT NOT NULL,
        seq BIGINT NOT NULL)""",
]


class Storage:
    """One database connection as the log uses it; thread-compatible, not thread-safe.

    Backends raise their driver's errors (``errors``); the log turns them into LedgerUnavailable.
    """

    url: str = ""  # printable: a PostgreSQL password is redacted
    dialect: str = ""
    errors: tuple[type[BaseException], ...] = ()
    in_snapshot: bool = False  # inside snapshot(): reads share one transaction

    def begin_write(self) -> Any:
        """Return a cursor in a new write transaction."""
        raise NotImplementedError

    def head_query(self) -> tuple[str, tuple[Any, ...]]:
        """SQL that locks the head row and returns (tree_size, frontier, last_ts, last_leaf, now µs)."""
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def rollback(self) -> None:
        raise NotImplementedError

    def read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run one read (already in the dialect's SQL) outside any write transaction."""
        raise NotImplementedError

    def begin_snapshot(self) -> None:
        raise NotImplementedError

    def end_snapshot(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def broken(self) -> None:
        """Forget a connection that failed; the next call reconnects."""

    def sql(self, sql: str) -> str:
        """The dialect's spelling of a statement written with ``?`` placeholders."""
        return sql

    def ddl(self, stmt: str) -> str:
        return stmt

    def pipeline(self) -> contextlib.AbstractContextManager[Any]:
        """Send the statements inside without waiting for each answer (PostgreSQL); errors surface at exit."""
        return contextlib.nullcontext()

    def init_schema(self) -> None:
        """Create the tables and the empty head row if missing; refuse another schema version."""
        try:
            cur = self.begin_write()
            try:
                if self.dialect == "postgresql":
                    cur.execute("SELECT pg_advisory_xact_lock(7270011)")  # two first starts at once
                for stmt in SCHEMA:
                    cur.execute(self.ddl(stmt))
                cur.execute(self.sql("INSERT INTO ledger_meta (key, value) VALUES ('schema', ?) ON CONFLICT (key) DO NOTHING"),
                            (SCHEMA_VERSION,))
                cur.execute(self.sql("INSERT INTO ledger_head (id, tree_size, frontier, last_ts, last_leaf) "
                                     "VALUES (1, 0, ?, 0, ?) ON CONFLICT (id) DO NOTHING"), (b"", bytes(32)))
                version = cur.execute(self.sql("SELECT value FROM ledger_meta WHERE key = 'schema'")).fetchone()[0]
                self.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    self.rollback()
                raise
        except self.errors as exc:
            raise LedgerUnavailable(f"ledger {self.url} cannot be initialised: {one_line(exc)}") from None
        if version != SCHEMA_VERSION:
            raise ConfigError(f"ledger {self.url} has schema {version}, this exfilguard speaks {SCHEMA_VERSION}")


class Reads:
    """A cursor's execute() over plain reads, for replaying in a read snapshot."""

    def __init__(self, db: Storage):
        self.db, self.rows = db, []

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Reads:
        self.rows = self.db.read(sql, tuple(params))
        return self

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def redact(url: str) -> str:
    """The URL with its password replaced by ***."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)
