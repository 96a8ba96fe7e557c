"""The PostgreSQL ledger backend: several meters on several hosts share one budget."""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg

from exfilguard.base_errors import LedgerUnavailable
from exfilguard.ledger.storage import Storage, one_line, redact


class PostgresStorage(Storage):
    """A ledger in PostgreSQL; several meters on several hosts may share its budgets."""

    dialect = "postgresql"
    errors = (psycopg.Error, OSError)

    def __init__(self, url: str, *, create: bool = True, connect_timeout: float = 5.0):
        self.url = redact(url)
        self._dsn = url
        self._timeout = connect_timeout
        self._conn: Any = None
        self._connect()
        if create:
            self.init_schema()

    def _connect(self) -> Any:
        try:
            self._conn = psycopg.connect(
                self._dsn, autocommit=False, connect_timeout=max(1, int(self._timeout)),
                # a dead server or network is noticed within ~9 s even on an idle connection
                keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=2,
            )
        except psycopg.Error as exc:
            self._conn = None
            raise LedgerUnavailable(f"cannot connect to ledger {self.url}: {one_line(exc)}") from None
        return self._conn

    def broken(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def begin_write(self) -> Any:
        return (self._conn or self._connect()).cursor()  # psycopg opens the transaction at the first statement

    def head_query(self) -> tuple[str, tuple[Any, ...]]:
        # The database's clock, so that meters on several hosts share one time line for windows.
        return ("SELECT tree_size, frontier, last_ts, last_leaf, (extract(epoch from clock_timestamp()) * 1000000)::bigint "
                "FROM ledger_head WHERE id = 1 FOR UPDATE", ())

    def pipeline(self) -> Any:
        return self._conn.pipeline()

    def sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def ddl(self, stmt: str) -> str:
        return stmt.replace("BLOB", "BYTEA")

    def commit(self) -> None:
        self._conn.commit()

    def rollback(self) -> None:
        if self._conn is not None:
            self._conn.rollback()

    def read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        conn = self._conn or self._connect()
        try:
            with conn.cursor() as cur:
                rows = cur.execute(sql, params).fetchall()
            if not self.in_snapshot:
                conn.rollback()  # end the read transaction: no snapshot held open
            return rows
        except BaseException:
            self.broken()
            raise

    def begin_snapshot(self) -> None:
        conn = self._conn or self._connect()
        conn.rollback()
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")

    def end_snapshot(self) -> None:
        if self._conn is not None:
            self._conn.rollback()

    def close(self) -> None:
        self.broken()
