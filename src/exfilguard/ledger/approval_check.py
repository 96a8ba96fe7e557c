"""What the replay needs to trust a k-of-n budget change: its approvals, checked against the set in force.

The rest of k-of-n governance (making, signing, applying requests) is in approvals.py, which the
meter never imports. A request is signed as the SHA-256 of its canonical JSON; an approval is
``{"public_key": hex raw Ed25519 key, "signature": hex}`` over ``APPROVAL_DOMAIN || digest``.
A signer's identity is its raw key: the same key twice counts once, a key outside the set zero.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from exfilguard.ledger.events import canonical

APPROVAL_DOMAIN = b"exfilguard-budget-approval-v1\x00"


def request_digest(request: dict[str, Any]) -> bytes:
    """Return the SHA-256 of the canonical request: what every approver signs."""
    return hashlib.sha256(canonical(request)).digest()


def verify_one(digest: bytes, public_hex: str, signature_hex: str) -> bool:
    """True when `signature_hex` is the key's valid signature of the request digest."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(bytes.fromhex(signature_hex), APPROVAL_DOMAIN + digest)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def needed(request: dict[str, Any]) -> int:
    """How many approvers a request needs: one to lower a cap, else the threshold of the set in force."""
    if request["action"] == "cap" and request["new_cap"] < request["old_cap"]:
        return 1
    return int(request["approvers"]["threshold"])


def event_approval_problems(event: dict[str, Any], keys: Sequence[str], threshold: int) -> list[str]:
    """What is wrong with a cap_change / approvers_set event's approvals against the set in force (empty: ok).

    The embedded request must ask for exactly this change, under this set, before it expired;
    its signatures must come from enough distinct keys of the set. Anything malformed is a finding.
    """
    req, approvals = event.get("request"), event.get("approvals")
    try:
        problems: list[str] = []
        if req["budget"] != event["budget"]:
            problems.append(f"its request is for budget {req['budget']!r}")
        if (req["approvers"]["threshold"], req["approvers"]["keys"]) != (threshold, sorted(keys)):
            problems.append("its request was made under another approver set than the one in force")
        if event["kind"] == "cap_change":
            if req["action"] != "cap" or (req["old_cap"], req["new_cap"]) != (event["old_cap"], event["new_cap"]):
                problems.append("its request does not ask for this cap change")
        elif req["action"] != "approvers" or req["new_approvers"] != {"threshold": event["threshold"], "keys": event["keys"]}:
            problems.append("its request does not ask for this approver set")
        if not isinstance(event["ts"], int) or event["ts"] > req["expires"]:
            problems.append("it was applied after its request expired")
        digest = request_digest(req)
        signed = [(a["public_key"], verify_one(digest, a["public_key"], a["signature"])) for a in approvals]
        need = needed(req)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return [f"its request or approvals are malformed ({type(exc).__name__}: {exc})"]
    bad = [_key_id(k) for k, ok in signed if not ok]
    if bad:
        problems.append(f"signatures by {', '.join(bad)} do not verify")
    good = {k for k, ok in signed if ok and k in set(keys)}
    if len(good) < need:
        problems.append(f"only {len(good)} distinct approver keys signed it, {need} needed")
    return problems


def _key_id(hex_key: str) -> str:
    """The 16-hex-digit key id (as ``keys.key_id``) of a hex raw public key ("?" if it is not one)."""
    try:
        return hashlib.sha256(bytes.fromhex(hex_key)).hexdigest()[:16]
    except (TypeError, ValueError):
        return "?"
