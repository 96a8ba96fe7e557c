"""exfilguard.ledger: the append-only, Merkle-hashed, signed record of every byte reserved.

Public API: ``open_ledger(url)`` returns a ``Ledger`` (SQLite or PostgreSQL);
``verify_ledger(ledger, public_keys)`` audits one; ``merkle`` holds the RFC 6962 functions.
"""

from exfilguard.ledger.keys import TreeHead, generate_keypair, load_private_key, load_public_key
from exfilguard.ledger.store import BudgetStatus, Grant, Ledger, Window, open_ledger
from exfilguard.ledger.verify import VerifyReport, verify_ledger

__all__ = [
    "BudgetStatus",
    "Grant",
    "Ledger",
    "TreeHead",
    "VerifyReport",
    "Window",
    "generate_keypair",
    "load_private_key",
    "load_public_key",
    "open_ledger",
    "verify_ledger",
]
