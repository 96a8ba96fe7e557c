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


def forge(url: str, kind: str, **fields) -> int:
    """Append an event straight into the database with a valid hash chain and head row, as an
    attacker with write access can (the library refuses to append an event that does not add up)."""
    import time

    from exfilguard.ledger import merkle
    from exfilguard.ledger.events import GENESIS_PREV, encode_event

    size, frontier, last_ts, last_leaf = q(url, "SELECT tree_size, frontier, last_ts, last_leaf FROM ledger_head WHERE id = 1")[0]
    frontier, last_leaf = bytes(frontier), bytes(last_leaf)
    ts = max(int(time.time() * 1_000_000), int(last_ts))
    event = {"v": 1, "seq": size, "ts": ts, "kind": kind, "prev": last_leaf.hex() if size else GENESIS_PREV, **fields}
    entry = encode_event(event)
    lh = merkle.leaf_hash(entry)
    new = merkle.frontier_append([frontier[i : i + 32] for i in range(0, len(frontier), 32)], size, lh)
    q(url, "INSERT INTO events (seq, entry) VALUES (?, ?)", (size, entry))
    q(url, "UPDATE ledger_head SET tree_size = ?, frontier = ?, last_ts = ?, last_leaf = ? WHERE id = 1",
      (size + 1, b"".join(new), ts, lh))
    return size
