"""k-of-n budget changes: a cap raise needs signatures from k distinct keys of the budget's
approver set; lowering a cap needs one; changing the approver set needs k of the current set.

A request is canonical JSON (``checkpoint.canonical_json``)::

    {"type": "exfilguard-budget-request-v1", "budget", "action": "cap" | "approvers",
     "old_cap", "new_cap"                      (action cap),
     "new_approvers": {"threshold", "keys"}    (action approvers),
     "approvers": {"threshold", "keys"}        (the set in force when the request was made),
     "head": {"tree_size", "ts", "root"}       (the ledger's head when the request was made),
     "reason", "nonce" (32 hex), "created", "expires" (microseconds since the epoch)}

An approval (signature file) is ``{"type": "exfilguard-budget-approval-v1", "request":
SHA-256 hex of the canonical request, "budget", "public_key": hex raw Ed25519 key,
"signature": hex}``, the signature over ``b"exfilguard-budget-approval-v1\\x00" || digest``.
A signer's identity is its raw public key: the same key twice counts once, a key outside the
set counts zero (the duplicate-signature flaws found in TUF implementations counted key ids).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from exfilguard.errors import (
    ApprovalsShort,
    ConfigError,
    RequestExpired,
    RequestReplayed,
    RequestTampered,
    WrongBudget,
)
from exfilguard.ledger import merkle
from exfilguard.ledger.checkpoint import canonical_json
from exfilguard.ledger.store import Ledger

REQUEST_TYPE = "exfilguard-budget-request-v1"
APPROVAL_TYPE = "exfilguard-budget-approval-v1"
APPROVAL_DOMAIN = b"exfilguard-budget-approval-v1\x00"
MAX_KEYS = 64


def raw_key(public: Ed25519PublicKey) -> str:
    """Return the hex of the raw 32-byte public key: an approver's identity."""
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def short_id(hex_key: str) -> str:
    """Return the 16-hex-digit key id (as ``keys.key_id``) of a hex raw public key ("?" if it is not one)."""
    try:
        return hashlib.sha256(bytes.fromhex(hex_key)).hexdigest()[:16]
    except (TypeError, ValueError):
        return "?"


def approver_set_json(threshold: int, keys: Sequence[str]) -> dict[str, Any]:
    """Return the canonical form of an approver set, refusing one that cannot work."""
    keys = list(keys)
    if len(set(keys)) != len(keys):
        raise ConfigError("the same approver key is given twice; every approver must hold a distinct key")
    if not keys or len(keys) > MAX_KEYS:
        raise ConfigError(f"an approver set needs 1 to {MAX_KEYS} keys (got {len(keys)})")
    if not isinstance(threshold, int) or isinstance(threshold, bool) or not 1 <= threshold <= len(keys):
        raise ConfigError(f"threshold {threshold} is not between 1 and the number of approvers ({len(keys)})")
    return {"threshold": threshold, "keys": sorted(keys)}


def request_digest(request: dict[str, Any]) -> bytes:
    """Return the SHA-256 of the canonical request: what every approver signs."""
    return hashlib.sha256(canonical_json(request)).digest()


def init_approvers(ledger: Ledger, budget: str, threshold: int, public_keys: Sequence[Ed25519PublicKey]) -> int:
    """Give a budget its first approver set; return the ledger entry that records it."""
    s = approver_set_json(threshold, [raw_key(k) for k in public_keys])
    return ledger.init_approvers(budget, s["threshold"], s["keys"])


def make_request(
    ledger: Ledger,
    budget: str,
    *,
    reason: str,
    expires_in: int,
    new_cap: int | None = None,
    new_approvers: tuple[int, Sequence[Ed25519PublicKey]] | None = None,
    now: int | None = None,
) -> dict[str, Any]:
    """Return a request to change the budget's cap or its approver set, bound to the ledger's head."""
    if (new_cap is None) == (new_approvers is None):
        raise ConfigError("a request changes either the cap (--cap) or the approver set (--approvers, --threshold)")
    if not reason.strip():
        raise ConfigError("say why in --reason: approvers sign it and the ledger keeps it")
    if expires_in <= 0:
        raise ConfigError("--expires must be a positive duration, e.g. 1h or 2d")
    st = ledger.status(budget)
    current = ledger.approver_set(budget)
    if current is None:
        raise ConfigError(f"budget {budget!r} has no approvers yet; set them once with `exfilguard budget init`")
    now = int(time.time() * 1_000_000) if now is None else now
    head = ledger.tree_head()
    req: dict[str, Any] = {
        "type": REQUEST_TYPE,
        "budget": st.budget,
        "approvers": {"threshold": current[0], "keys": current[1]},
        "head": {"tree_size": head.tree_size, "ts": head.ts, "root": head.root.hex()},
        "reason": reason,
        "nonce": secrets.token_hex(16),
        "created": now,
        "expires": now + expires_in * 1_000_000,
    }
    if new_cap is not None:
        if new_cap < 0:
            raise ConfigError("a cap must be a non-negative number of bytes")
        if new_cap == st.cap_bytes:
            raise ConfigError(f"budget {budget!r} already has cap {new_cap} bytes")
        req.update(action="cap", old_cap=st.cap_bytes, new_cap=new_cap)
    else:
        assert new_approvers is not None
        s = approver_set_json(new_approvers[0], [raw_key(k) for k in new_approvers[1]])
        if (s["threshold"], s["keys"]) == current:
            raise ConfigError(f"budget {budget!r} already has exactly this approver set")
        req.update(action="approvers", new_approvers=s)
    return check_request(req)


def _fail(msg: str) -> None:
    raise RequestTampered(f"request is malformed: {msg}")


MAX_BYTES = 2**63 - 1  # a BIGINT column
MAX_TIME = 253_402_300_799_000_000  # 9999-12-31, microseconds: printable as a date


def _is_int(v: Any, limit: int = MAX_BYTES) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= limit


def _check_set(s: Any, what: str) -> None:
    if not isinstance(s, dict) or set(s) != {"threshold", "keys"} or not isinstance(s["keys"], list):
        _fail(f"{what} is not {{threshold, keys}}")
    if not all(isinstance(k, str) and len(k) == 64 and all(c in "0123456789abcdef" for c in k) for k in s["keys"]):
        _fail(f"{what} holds something that is not a hex Ed25519 public key")
    try:
        ok = approver_set_json(s["threshold"], s["keys"]) == s
    except ConfigError as exc:
        _fail(f"{what}: {exc}")
    if not ok:
        _fail(f"{what} keys are not sorted")


def check_request(req: Any) -> dict[str, Any]:
    """Return the request if it has exactly the fields of its action, well typed; else RequestTampered."""
    if not isinstance(req, dict) or req.get("type") != REQUEST_TYPE:
        _fail(f"not an {REQUEST_TYPE} object")
    base = {"type", "budget", "action", "approvers", "head", "reason", "nonce", "created", "expires"}
    action = req.get("action")
    extra = {"cap": {"old_cap", "new_cap"}, "approvers": {"new_approvers"}}.get(action) if isinstance(action, str) else None
    if extra is None:
        _fail(f"unknown action {req.get('action')!r}")
    if set(req) != base | extra:
        _fail(f"fields {sorted(set(req) ^ (base | extra))} are missing or unexpected")
    if not isinstance(req["budget"], str) or not req["budget"] or not isinstance(req["reason"], str):
        _fail("budget and reason must be strings")
    n = req["nonce"]
    if not (isinstance(n, str) and len(n) == 32 and all(c in "0123456789abcdef" for c in n)):
        _fail("nonce is not 32 hex digits")
    if not (_is_int(req["created"], MAX_TIME) and _is_int(req["expires"], MAX_TIME) and req["expires"] > req["created"]):
        _fail("created/expires are not times with expires after created")
    h = req["head"]
    if not (isinstance(h, dict) and set(h) == {"tree_size", "ts", "root"} and _is_int(h["tree_size"]) and _is_int(h["ts"])
            and isinstance(h["root"], str) and len(h["root"]) == 64):
        _fail("head is not {tree_size, ts, root}")
    _check_set(req["approvers"], "approvers")
    if req["action"] == "cap":
        if not (_is_int(req["old_cap"]) and _is_int(req["new_cap"])):
            _fail("old_cap/new_cap are not byte counts")
    else:
        _check_set(req["new_approvers"], "new_approvers")
    return req


def approve(request: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """Return the approval of `request` signed by `key`."""
    check_request(request)
    digest = request_digest(request)
    return {
        "type": APPROVAL_TYPE,
        "request": digest.hex(),
        "budget": request["budget"],
        "public_key": raw_key(key.public_key()),
        "signature": key.sign(APPROVAL_DOMAIN + digest).hex(),
    }


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write a request or approval file (canonical JSON and a newline); refuse to overwrite one."""
    path = Path(path)
    if path.exists():
        raise ConfigError(f"{path} exists; refusing to overwrite it")
    path.write_bytes(canonical_json(obj) + b"\n")


def _load(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestTampered(f"{what} {path} is not JSON: {exc}") from None


def load_request(path: Path) -> dict[str, Any]:
    """Read and check a request file."""
    try:
        return check_request(_load(path, "request"))
    except RequestTampered as exc:
        raise RequestTampered(f"{path}: {exc}") from None


def load_approval(path: Path) -> dict[str, Any]:
    """Read an approval file; RequestTampered unless it has exactly the approval fields."""
    a = _load(path, "signature file")
    if not (isinstance(a, dict) and a.get("type") == APPROVAL_TYPE
            and set(a) == {"type", "request", "budget", "public_key", "signature"}
            and all(isinstance(a[k], str) for k in ("request", "budget", "public_key", "signature"))
            and _is_hex(a["request"], 64) and _is_hex(a["public_key"], 64) and _is_hex(a["signature"], 128)):
        raise RequestTampered(f"{path} is not an {APPROVAL_TYPE} signature file")
    return a


def _is_hex(text: str, n: int) -> bool:
    return len(text) == n and all(c in "0123456789abcdefABCDEF" for c in text)


def _verify_one(digest: bytes, public_hex: str, signature_hex: str) -> bool:
    try:
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        pub.verify(bytes.fromhex(signature_hex), APPROVAL_DOMAIN + digest)
    except (ValueError, InvalidSignature):
        return False
    return True


@dataclass
class Tally:
    """How the signatures on a request counted against an approver set."""

    counted: list[dict[str, str]]  # one {public_key, signature} per distinct approver key, sorted
    duplicates: int = 0
    unknown: int = 0


def tally(request: dict[str, Any], approvals: Sequence[dict[str, Any]], keys: Sequence[str]) -> Tally:
    """Count the approvals of `request` by distinct keys of `keys`.

    A signature that does not verify, or that is for another request, raises RequestTampered:
    someone changed the request or the signature file after signing.
    """
    digest = request_digest(request)
    allowed = set(keys)
    seen: dict[str, str] = {}
    t = Tally([])
    for i, a in enumerate(approvals):
        # identity is the key's bytes, not its spelling: "AB.." and "ab.." are one approver
        a = {**a, "public_key": a["public_key"].lower()}
        who = short_id(a["public_key"])
        if a["request"] != digest.hex():
            raise RequestTampered(
                f"signature #{i + 1} (key {who}) is for request {a['request'][:16]}..., not this one "
                f"({digest.hex()[:16]}...): the request was changed after it was signed, or the signature is for another request"
            )
        if not _verify_one(digest, a["public_key"], a["signature"]):
            raise RequestTampered(f"signature #{i + 1} (key {who}) does not verify: the signature file was changed")
        if a["public_key"] in seen:
            t.duplicates += 1
        elif a["public_key"] not in allowed:
            t.unknown += 1
        else:
            seen[a["public_key"]] = a["signature"]
    t.counted = [{"public_key": k, "signature": seen[k]} for k in sorted(seen)]
    return t


def needed(request: dict[str, Any]) -> int:
    """Return how many approvers the request needs: one to lower a cap, else the threshold."""
    if request["action"] == "cap" and request["new_cap"] < request["old_cap"]:
        return 1
    return int(request["approvers"]["threshold"])


def describe(request: dict[str, Any]) -> str:
    """Return what approving the request means, in a few lines for a human."""
    import datetime

    def t(us: int) -> str:
        return datetime.datetime.fromtimestamp(us / 1e6, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    r = request
    ap = r["approvers"]
    if r["action"] == "cap":
        verb = "RAISE" if r["new_cap"] > r["old_cap"] else "LOWER"
        what = f"{verb} the cap of budget {r['budget']!r} from {r['old_cap']:,} to {r['new_cap']:,} bytes"
    else:
        na = r["new_approvers"]
        what = (f"REPLACE the approvers of budget {r['budget']!r} with {na['threshold']} of "
                f"{len(na['keys'])}: {', '.join(short_id(k) for k in na['keys'])}")
    return "\n".join([
        what,
        f"reason: {r['reason']}",
        f"needs {needed(r)} of the current {len(ap['keys'])} approvers ({', '.join(short_id(k) for k in ap['keys'])})",
        f"made {t(r['created'])} at ledger size {r['head']['tree_size']} (root {r['head']['root'][:16]}...)",
        f"expires {t(r['expires'])}; nonce {r['nonce']}; digest {request_digest(r).hex()}",
    ])


def apply_request(
    ledger: Ledger, request: dict[str, Any], approvals: Sequence[dict[str, Any]], budget: str | None = None
) -> int:
    """Apply the request if enough distinct approvers signed it; return the ledger entry.

    Refuses, each with its own error: a request for another budget or ledger (WrongBudget),
    changed after signing (RequestTampered), applied before (RequestReplayed), expired
    (RequestExpired), made before the cap or approver set changed (RequestStale), and too few
    distinct known approver keys (ApprovalsShort). The ledger re-checks expiry, nonce, cap and
    approver set in the transaction that applies it.
    """
    check_request(request)
    name = request["budget"]
    if budget is not None and budget != name:
        raise WrongBudget(f"the request is for budget {name!r}, not {budget!r}")
    if name not in ledger.budgets():
        raise WrongBudget(f"the request is for budget {name!r}, which ledger {ledger.url} does not have")
    for i, a in enumerate(approvals):
        if a["budget"] != name:
            raise WrongBudget(f"signature #{i + 1} approves a request for budget {a['budget']!r}, not {name!r}")
    t = tally(request, approvals, request["approvers"]["keys"])
    seq = ledger.applied_request(request["nonce"])
    if seq is not None:
        raise RequestReplayed(f"request {request['nonce']} was applied already (ledger entry {seq}); make a new request")
    if time.time() * 1_000_000 > request["expires"]:
        raise RequestExpired(f"request {request['nonce']} has expired; make a new request")
    _check_history(ledger, request)
    k = needed(request)
    if len(t.counted) < k:
        notes = [f"{t.duplicates} duplicate signature(s) by the same key counted once"] if t.duplicates else []
        notes += [f"{t.unknown} signature(s) by keys outside the approver set counted zero"] if t.unknown else []
        raise ApprovalsShort(
            f"{len(t.counted)} of the {k} approvals needed: signatures by distinct approver keys "
            f"{', '.join(short_id(c['public_key']) for c in t.counted) or '(none)'}"
            + (f" ({'; '.join(notes)})" if notes else "")
        )
    ap = request["approvers"]
    common = dict(nonce=request["nonce"], expires=request["expires"], approvers=(ap["threshold"], ap["keys"]),
                  approvals=t.counted, request=request)
    if request["action"] == "cap":
        return ledger.apply_budget_change(name, old_cap=request["old_cap"], new_cap=request["new_cap"], **common)
    na = request["new_approvers"]
    return ledger.apply_budget_change(name, new_approvers=(na["threshold"], na["keys"]), **common)


def _check_history(ledger: Ledger, request: dict[str, Any]) -> None:
    """Refuse a request whose ledger head is not in this ledger's history (another ledger, or rewritten)."""
    h = request["head"]
    leaves: list[bytes] = []
    for seq, entry in ledger.entries():
        if seq >= h["tree_size"]:
            break
        leaves.append(merkle.leaf_hash(entry))
    if len(leaves) != h["tree_size"] or merkle.root(leaves).hex() != h["root"]:
        raise WrongBudget(
            f"the request was made on a ledger whose first {h['tree_size']} entries hash to {h['root'][:16]}...; "
            f"this ledger's do not: the request is for another ledger (or this ledger's history was rewritten)"
        )


def check_event_approvals(event: dict[str, Any], keys: Sequence[str], threshold: int) -> list[str]:
    """Return what is wrong with a cap_change / approvers_set event's approvals against a set (empty: ok).

    Used offline (``verify``): the embedded request must match the event, and its signatures
    must come from enough distinct keys of the set in force.
    """
    req = event.get("request")
    try:
        check_request(req)
    except RequestTampered as exc:
        return [f"its request is malformed ({exc})"]
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
    approvals = event.get("approvals")
    if not isinstance(approvals, list) or not all(
        isinstance(a, dict) and isinstance(a.get("public_key"), str) and isinstance(a.get("signature"), str) for a in approvals
    ):
        return problems + ["its approvals are malformed"]
    digest = request_digest(req)
    good = {a["public_key"] for a in approvals if a["public_key"] in set(keys) and _verify_one(digest, a["public_key"], a["signature"])}
    bad = [short_id(a["public_key"]) for a in approvals
           if not _verify_one(digest, a["public_key"], a["signature"])]
    if bad:
        problems.append(f"signatures by {', '.join(bad)} do not verify")
    if len(good) < needed(req):
        problems.append(f"only {len(good)} distinct approver keys signed it, {needed(req)} needed")
    return problems
