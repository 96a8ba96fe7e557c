"""exfilguard.ledger: the append-only, Merkle-hashed, signed record of every byte reserved.

Public API: ``open_ledger(url)`` returns a ``Ledger`` over SQLite or PostgreSQL storage;
``merkle`` holds the RFC 6962 functions. The meter's trusted path is store.py (the log and its
transactions), accounting.py (the rules), storage.py with sqlite.py/postgres.py, events.py,
merkle.py, keys.py and approval_check.py. The row reads of the CLI and the dashboard (reads.py),
key files (keytools.py), governance and audit (``verify.verify_ledger``, approvals.py, apikeys.py,
checkpoint.py, proofs.py) are imported by the CLI, never from here.
"""

from urllib.parse import urlparse

from exfilguard.base_errors import ConfigError
from exfilguard.ledger.accounting import BudgetStatus, Grant, Window
from exfilguard.ledger.keys import TreeHead, load_private_key
from exfilguard.ledger.storage import redact
from exfilguard.ledger.store import Ledger


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
        from exfilguard.ledger.sqlite import SQLiteStorage

        return Ledger(SQLiteStorage(url, path, create=create))
    if scheme in ("postgresql", "postgres"):
        if not urlparse(url).hostname and "host=" not in url:
            raise ConfigError(f"ledger URL {redact(url)!r} names no host")
        from exfilguard.ledger.postgres import PostgresStorage

        return Ledger(PostgresStorage(url, create=create))
    raise ConfigError(f"unknown ledger URL scheme {scheme!r} in {redact(url)!r}; use sqlite:///PATH or postgresql://...")


__all__ = [
    "BudgetStatus",
    "Grant",
    "Ledger",
    "TreeHead",
    "Window",
    "load_private_key",
    "open_ledger",
]
