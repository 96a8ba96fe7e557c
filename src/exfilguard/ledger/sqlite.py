"""The SQLite ledger backend: one file, WAL, synchronous=FULL, writes under BEGIN IMMEDIATE."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

from exfilguard.base_errors import ConfigError, LedgerUnavailable
from exfilguard.ledger.storage import Storage


class SQLiteStorage(Storage):
    """A ledger in one SQLite file: WAL, synchronous=FULL, writes under BEGIN IMMEDIATE.

    The file, its -wal and -shm and their directory are watched as a whole, before every write
    transaction and after every commit: one without write permission bits counts as frozen, even
    for root (``chmod a-w ledger.db`` is an operator's kill switch); one deleted or replaced
    (another inode) means this connection writes where nobody will read after a crash, so what it
    committed is checkpointed into the main file, the connection dropped, and the write refused.
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
        self._ids: dict[str, tuple[int, int]] | None = None  # (st_dev, st_ino) of each watched file, once it exists
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

    def check_writable(self, after_commit: bool = False) -> None:
        """Raise LedgerUnavailable when the file, its -wal or -shm or the directory is gone, replaced
        (another inode than at the first commit) or has no write permission bits."""
        files = [self.path, self.path + "-wal", self.path + "-shm", os.path.dirname(os.path.abspath(self.path))]
        now: dict[str, tuple[int, int]] = {}
        for f in files:
            try:
                st = os.stat(f)
            except OSError as exc:
                if f == self.path or self._ids is not None:  # -wal and -shm appear with the first write
                    self._lost(f"ledger file {f} is gone: {exc.strerror}")
                continue
            if not st.st_mode & 0o222:
                raise LedgerUnavailable(f"ledger file {f} is read-only")
            now[f] = (st.st_dev, st.st_ino)
        if self._ids is None:
            if after_commit and len(now) == len(files):
                self._ids = now
            return
        for f in files:
            if now[f] != self._ids[f]:
                self._lost(f"ledger file {f} was replaced (another file is at its path now)")

    def _lost(self, why: str) -> None:
        """A watched file is gone or replaced: save what this connection committed into the main
        file (if it is still the one at the path), drop the connection, refuse the write."""
        if self._conn is not None:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(FULL)")  # synchronous=FULL: the main file is synced
            except sqlite3.Error:
                pass
            self._conn.close()
            self._conn = None
        self._ids = None
        raise LedgerUnavailable(why)

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
        self.check_writable(after_commit=True)  # a commit into a deleted -wal must not be used

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
