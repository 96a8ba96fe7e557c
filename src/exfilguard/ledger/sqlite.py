"""The SQLite ledger backend: one file, WAL, synchronous=FULL, writes under BEGIN IMMEDIATE."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

from exfilguard.errors import ConfigError, LedgerUnavailable
from exfilguard.ledger.storage import Storage


class SQLiteStorage(Storage):
    """A ledger in one SQLite file: WAL, synchronous=FULL, writes under BEGIN IMMEDIATE.

    A ledger file with no write permission bits is treated as frozen, even for root: the meter
    stops forwarding (``chmod a-w ledger.db`` is an operator's kill switch).
    """

    dialect = "sqlite"
    errors = (sqlite3.Error, OSError)

    def __init__(self, url: str, path: str, *, create: bool = True):
        self.url = url
        self.path = path
        if not create and not os.path.exists(path):
            raise ConfigError(f"no ledger at {path}")
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d):
            raise ConfigError(f"ledger directory {d} does not exist")
        self._conn: sqlite3.Connection | None = None
        self._connect()
        if create:
            self.check_writable()
            self.init_schema()

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.execute("PRAGMA busy_timeout = 30000")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"cannot open ledger {self.path}: {exc}") from None
        if str(mode).lower() != "wal":
            conn.close()
            raise LedgerUnavailable(f"ledger {self.path} cannot use WAL mode (got {mode})")
        self._conn = conn
        return conn

    def check_writable(self) -> None:
        """Raise LedgerUnavailable when the file is gone or has no write permission bits."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise LedgerUnavailable(f"ledger file {self.path} is gone: {exc.strerror}") from None
        if not st.st_mode & 0o222:
            raise LedgerUnavailable(f"ledger file {self.path} is read-only")

    def begin_write(self) -> sqlite3.Cursor:
        conn = self._conn or self._connect()
        self.check_writable()
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        return cur

    def head_query(self) -> tuple[str, tuple[Any, ...]]:
        # BEGIN IMMEDIATE already holds the write lock; the clock is this host's
        return "SELECT tree_size, frontier, last_ts, last_leaf, ? FROM ledger_head WHERE id = 1", (int(time.time() * 1_000_000),)

    def commit(self) -> None:
        assert self._conn is not None
        self._conn.execute("COMMIT")

    def rollback(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def begin_snapshot(self) -> None:
        (self._conn or self._connect()).execute("BEGIN")  # deferred: WAL gives it one snapshot from its first read

    def end_snapshot(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            self._conn.execute("COMMIT")

    def read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return (self._conn or self._connect()).execute(sql, params).fetchall()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
