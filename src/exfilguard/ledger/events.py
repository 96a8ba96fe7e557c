"""The leaf bytes of the ledger: one event per Merkle leaf, canonical JSON.

An entry is the UTF-8 of ``json.dumps(event, sort_keys=True, separators=(",", ":"),
ensure_ascii=True)`` where event holds at least ``v`` (format version, 1), ``seq`` (its index
in the log, from 0), ``ts`` (microseconds since the Unix epoch, never decreasing along the
log), ``kind`` and ``prev`` (hex SHA-256 leaf hash of the previous entry; 64 zeros for the
first). The canonical form makes the encoding a function of the event: an auditor can
re-encode what it decoded and must get the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

FORMAT_VERSION = 1
GENESIS_PREV = "0" * 64

# kind -> the fields each event of that kind carries besides v, seq, ts, kind, prev.
KINDS: dict[str, tuple[str, ...]] = {
    "budget_created": ("budget", "cap", "windows"),
    "meter_start": ("budget", "meter", "pid", "listen", "upstream", "block", "key"),
    "meter_stop": ("budget", "meter", "bytes_out", "bytes_in"),
    "reserve": ("budget", "meter", "conn", "amount", "reserved"),
    "release": ("budget", "meter", "res", "used", "returned", "reserved"),
    "deny": ("budget", "meter", "conn", "reason"),
    "cap_change": ("budget", "old_cap", "new_cap", "approvals", "request"),
    # a budget's k-of-n approver set: keys = sorted hex raw Ed25519 public keys; the first set
    # of a budget has request null and no approvals, every later one carries both
    "approvers_set": ("budget", "threshold", "keys", "approvals", "request"),
    # API keys (ledger/apikeys.py): each key owns the budget "key:NAME"; its bytes are reserved
    # and released there like a meter's, and bytes past its cap are recorded, never dropped.
    "key_added": ("budget", "key", "key_id"),
    "key_revoked": ("budget", "key"),
    "key_overrun": ("budget", "key", "bytes"),
}


def canonical(obj: Any) -> bytes:
    """The canonical JSON bytes of `obj`: what entries are and what signatures cover."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def encode_event(event: dict[str, Any]) -> bytes:
    """Return the canonical leaf bytes of an event (raises ValueError on an unknown kind)."""
    kind = event.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown ledger event kind {kind!r}")
    missing = [f for f in ("v", "seq", "ts", "prev", *KINDS[kind]) if f not in event]
    if missing:
        raise ValueError(f"{kind} event lacks {', '.join(missing)}")
    return canonical(event)


def decode_event(entry: bytes) -> dict[str, Any]:
    """Parse leaf bytes; raise ValueError unless they are the canonical encoding of a known event."""
    try:
        event = json.loads(entry.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a ledger entry ({exc})") from None
    if not isinstance(event, dict):
        raise ValueError("not a ledger entry (not an object)")
    if encode_event(event) != entry:
        raise ValueError("entry is not in canonical form")
    if event["v"] != FORMAT_VERSION:
        raise ValueError(f"unknown entry format version {event['v']!r}")
    return event
