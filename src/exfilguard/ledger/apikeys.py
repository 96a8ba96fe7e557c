"""API keys and their budgets, kept in a ledger: each key owns the budget ``key:NAME``.

A key's secret is shown once (``exfilguard keys add``) and stored only as its SHA-256. Its
budget is an ordinary ledger budget (cap and rolling windows, reserve/release events), so
``ledger verify`` checks a key's accounting like a meter's. Adding and revoking a key are
events too (``key_added``, ``key_revoked``); bytes a key used past its cap (only possible when
frames were already on the wire when its budget ran out) are recorded as ``key_overrun``.

These budgets sit under the meter's global cap: they divide what the meter lets out between
clients, they do not replace it.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from exfilguard.errors import ConfigError
from exfilguard.ledger.accounting import Grant, Window, windows_to_json
from exfilguard.ledger import reads
from exfilguard.ledger.store import BudgetStatus, Ledger

KEY_PREFIX = "sk-exfilguard-"
BUDGET_PREFIX = "key:"
UNLIMITED = 1 << 62  # a key added without --cap: only the meter's global cap limits it
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_DDL = """CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    budget TEXT NOT NULL,
    created BIGINT NOT NULL,
    revoked BIGINT)"""


def hash_key(secret: str) -> str:
    """The stored form of a key: hex SHA-256 of its UTF-8."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One API key as stored (never its secret)."""

    name: str
    key_id: str  # first 16 hex of the key's SHA-256: safe to print and log
    budget: str
    created: int  # microseconds since the epoch
    revoked: int | None

    @property
    def active(self) -> bool:
        return self.revoked is None


class KeyStore:
    """API keys in one ledger; safe to call from several threads (one lock around the ledger)."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self._lock = threading.Lock()
        with self._lock:
            self.ledger.write(lambda cur, head: cur.execute(self.ledger.db.ddl(_DDL)))

    # -- administration ------------------------------------------------------------------
    def add(self, name: str, cap: int | None = None, windows: Sequence[Window] = ()) -> str:
        """Create key NAME with its own budget; return the secret (shown once, stored hashed)."""
        if not _NAME.fullmatch(name or ""):
            raise ConfigError(f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        cap_bytes = UNLIMITED if cap is None else cap
        if cap_bytes < 0:
            raise ConfigError("a key's cap must be a non-negative number of bytes")
        secret = KEY_PREFIX + secrets.token_urlsafe(24)
        h = hash_key(secret)
        budget = BUDGET_PREFIX + name
        wjson = windows_to_json(windows)
        led = self.ledger

        def body(cur: Any, head: Any) -> None:
            if cur.execute(led.db.sql("SELECT name FROM api_keys WHERE name = ?"), (name,)).fetchone():
                raise ConfigError(f"key {name!r} exists already (revoked keys keep their name); choose another name")
            if cur.execute(led.db.sql("SELECT name FROM budgets WHERE name = ?"), (budget,)).fetchone():
                raise ConfigError(f"budget {budget!r} exists already in ledger {led.url}; choose another key name")
            cur.execute(led.db.sql("INSERT INTO budgets (name, cap_bytes, reserved_bytes, outstanding_bytes, windows) "
                                 "VALUES (?, ?, 0, 0, ?)"), (budget, cap_bytes, wjson))
            led.append(cur, head, "budget_created", budget=budget, cap=cap_bytes, windows=json.loads(wjson))
            cur.execute(led.db.sql("INSERT INTO api_keys (name, key_hash, budget, created, revoked) VALUES (?, ?, ?, ?, NULL)"),
                        (name, h, budget, head.now))
            led.append(cur, head, "key_added", budget=budget, key=name, key_id=h[:16])

        with self._lock:
            led.write(body)
        return secret

    def revoke(self, name: str) -> None:
        """Revoke key NAME: it authenticates nothing from now on (its budget and history stay)."""
        led = self.ledger

        def body(cur: Any, head: Any) -> None:
            row = cur.execute(led.db.sql("SELECT budget, revoked FROM api_keys WHERE name = ?"), (name,)).fetchone()
            if row is None:
                raise ConfigError(f"no key {name!r} in ledger {led.url} (exfilguard keys list shows them)")
            if row[1] is not None:
                raise ConfigError(f"key {name!r} is revoked already")
            cur.execute(led.db.sql("UPDATE api_keys SET revoked = ? WHERE name = ?"), (head.now, name))
            led.append(cur, head, "key_revoked", budget=row[0], key=name)

        with self._lock:
            led.write(body)

    def keys(self) -> list[ApiKey]:
        """Every key, active and revoked, by name."""
        with self._lock:
            rows = reads.query(self.ledger, "SELECT name, key_hash, budget, created, revoked FROM api_keys ORDER BY name")
        return [ApiKey(r[0], r[1][:16], r[2], int(r[3]), None if r[4] is None else int(r[4])) for r in rows]

    # -- serving -------------------------------------------------------------------------
    def lookup(self, secret: str) -> ApiKey | None:
        """The active key whose secret this is, else None (revocation takes effect at once)."""
        with self._lock:
            rows = reads.query(self.ledger, 
                "SELECT name, key_hash, budget, created, revoked FROM api_keys WHERE key_hash = ?", (hash_key(secret),))
        if not rows or rows[0][4] is not None:
            return None
        r = rows[0]
        return ApiKey(r[0], r[1][:16], r[2], int(r[3]), None)

    def status(self, key: ApiKey) -> BudgetStatus:
        """The key's budget: cap, used, remaining, windows."""
        with self._lock:
            return reads.status(self.ledger, key.budget)

    def reserve(self, key: ApiKey, want: int, conn: int = 0) -> Grant:
        """Reserve up to `want` bytes of the key's budget (as many as its cap and windows allow)."""
        with self._lock:
            return self.ledger.reserve(key.budget, want, meter="outside", conn=conn)

    def release(self, res: int, used: int) -> int:
        """Settle a reservation at `used` bytes; return the bytes given back."""
        with self._lock:
            return self.ledger.release(res, used, meter="outside")

    def overrun(self, key: ApiKey, nbytes: int) -> None:
        """Record bytes a key used past its budget (they had crossed the meter already)."""
        with self._lock:
            self.ledger.record("key_overrun", budget=key.budget, key=key.name, bytes=nbytes)

    def retry_after(self, key: ApiKey) -> int | None:
        """Seconds until one of the key's windows frees bytes; None when its cap is what is spent."""
        st = self.status(key)
        if st.remaining_bytes <= 0:
            return None
        now = int(time.time() * 1_000_000)
        waits = []
        with self._lock:
            for w in st.windows:
                if w["remaining_bytes"] > 0:
                    continue
                rows = reads.query(self.ledger, "SELECT MIN(ts) FROM reservations WHERE budget = ? AND ts > ?",
                                         (key.budget, now - w["seconds"] * 1_000_000))
                oldest = rows[0][0] if rows and rows[0][0] is not None else now
                waits.append(max(1, -(-(int(oldest) + w["seconds"] * 1_000_000 - now) // 1_000_000)))
        return max(waits) if waits else 1


def remaining_of(st: BudgetStatus) -> int:
    """Bytes a budget can still grant: its cap's room and every window's."""
    return min([st.remaining_bytes] + [w["remaining_bytes"] for w in st.windows])
