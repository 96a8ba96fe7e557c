"""Test helper: SQL against a ledger's database directly, as an attacker with database access would."""

from __future__ import annotations

import sqlite3


def q(url: str, sql: str, params: tuple = ()) -> list:
    """Run SQL (``?`` placeholders) on the SQLite file or PostgreSQL database behind a ledger URL."""
    if url.startswith("postgresql"):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(sql.replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []
    conn = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()
