"""The SQLite ledger backend: one file, WAL, synchronous=FULL, writes under BEGIN IMMEDIATE."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from exfilguard.errors import ConfigError, LedgerUnavailable
from exfilguard.ledger.store import Ledger


class SQLiteLedger(Ledger):
    """A ledger in one SQLite file: WAL, synchronous=FULL, writes under BEGIN IMMEDIATE.

    A ledger file with no write permission bits is treated as frozen, even for root: the meter
    stops forwarding (``chmod a-w ledger.db`` is an operator's kill switch).
    """

    dialect = "sqlite"

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
            self._check_writable()
            self._init_schema()

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error, OSError)

    def _connect(self) -> None:
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

    def _check_writable(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise LedgerUnavailable(f"ledger file {self.path} is gone: {exc.strerror}") from None
        if not st.st_mode & 0o222:
            raise LedgerUnavailable(f"ledger file {self.path} is read-only")

    def _begin_write(self) -> sqlite3.Cursor:
        if self._conn is None:
            self._connect()
        assert self._conn is not None
        self._check_writable()
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        return cur

    def _head_sql(self) -> str:
        return "SELECT tree_size, frontier, last_ts, last_leaf, ? FROM ledger_head WHERE id = 1"

    def _head_params(self) -> tuple[Any, ...]:
        return (int(time.time() * 1_000_000),)

    def _commit(self) -> None:
        assert self._conn is not None
        self._conn.execute("COMMIT")

    def _rollback(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def _begin_snapshot(self) -> None:
        if self._conn is None:
            self._connect()
        assert self._conn is not None
        self._conn.execute("BEGIN")  # deferred: WAL gives this transaction one snapshot from its first read

    def _end_snapshot(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            self._conn.execute("COMMIT")

    def _read_rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        if self._conn is None:
            self._connect()
        assert self._conn is not None
        return self._conn.execute(sql, tuple(params)).fetchall()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
