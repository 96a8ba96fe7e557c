"""The PostgreSQL ledger backend: several meters on several hosts share one budget."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from exfilguard.errors import LedgerUnavailable
from exfilguard.ledger.store import Ledger, _one_line, _redact


class PostgresLedger(Ledger):
    """A ledger in PostgreSQL; several meters on several hosts may share its budgets."""

    dialect = "postgresql"

    def __init__(self, url: str, *, create: bool = True, connect_timeout: float = 5.0):
        self.url = _redact(url)
        self._dsn = url
        self._timeout = connect_timeout
        self._conn: Any = None
        self._connect()
        if create:
            self._init_schema()

    def _errors(self) -> tuple[type[BaseException], ...]:
        import psycopg

        return (psycopg.Error, OSError)

    def _connect(self) -> None:
        import psycopg

        try:
            self._conn = psycopg.connect(
                self._dsn,
                autocommit=False,
                connect_timeout=max(1, int(self._timeout)),
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=2,
            )
        except psycopg.Error as exc:
            self._conn = None
            raise LedgerUnavailable(f"cannot connect to ledger {self.url}: {_one_line(exc)}") from None

    def _broken(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def _begin_write(self) -> Any:
        if self._conn is None:
            self._connect()
        return self._conn.cursor()

    def _head_sql(self) -> str:
        # The database's clock, so that meters on several hosts share one time line for windows.
        return (
            "SELECT tree_size, frontier, last_ts, last_leaf, "
            "(extract(epoch from clock_timestamp()) * 1000000)::bigint FROM ledger_head WHERE id = 1 FOR UPDATE"
        )

    def _pipeline(self) -> Any:
        return self._conn.pipeline()

    def _lock_row(self) -> str:
        return " FOR UPDATE"

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _ddl(self, stmt: str) -> str:
        return stmt.replace("BLOB", "BYTEA")

    def _commit(self) -> None:
        self._conn.commit()

    def _rollback(self) -> None:
        if self._conn is not None:
            self._conn.rollback()

    def _read_rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        if self._conn is None:
            self._connect()
        try:
            with self._conn.cursor() as cur:
                rows = cur.execute(sql, tuple(params)).fetchall()
            if not self._snapshot_depth:
                self._conn.rollback()  # end the read transaction: no snapshot held open
            return rows
        except BaseException:
            self._broken()
            raise

    def _begin_snapshot(self) -> None:
        if self._conn is None:
            self._connect()
        self._conn.rollback()
        self._conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")

    def _end_snapshot(self) -> None:
        if self._conn is not None:
            self._conn.rollback()

    def close(self) -> None:
        self._broken()
