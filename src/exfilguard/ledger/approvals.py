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

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from exfilguard.errors import (
    ApprovalRefused,
    ApprovalsShort,
    ConfigError,
    LedgerTampered,
    RequestExpired,
    RequestReplayed,
    RequestStale,
    RequestTampered,
    WrongBudget,
)
from exfilguard.ledger import merkle
from exfilguard.ledger import reads
from exfilguard.ledger.approval_check import APPROVAL_DOMAIN, event_approval_problems, needed, request_digest, verify_one
from exfilguard.ledger.events import canonical as canonical_json
from exfilguard.ledger.store import Ledger

REQUEST_TYPE = "exfilguard-budget-request-v1"
APPROVAL_TYPE = "exfilguard-budget-approval-v1"
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


def approver_set(ledger: Ledger, budget: str) -> tuple[int, list[str]] | None:
    """Return a budget's (threshold, sorted hex public keys), or None when it has none yet."""
    rows = reads.query(ledger, "SELECT threshold, keys FROM budget_approvers WHERE budget = ?", (budget,))
    return (int(rows[0][0]), list(json.loads(rows[0][1]))) if rows else None


def applied_request(ledger: Ledger, nonce: str) -> int | None:
    """Return the ledger entry that applied the request with this nonce, or None."""
    rows = reads.query(ledger, "SELECT seq FROM applied_requests WHERE nonce = ?", (nonce,))
    return int(rows[0][0]) if rows else None


def init_approvers(ledger: Ledger, budget: str, threshold: int, public_keys: Sequence[Ed25519PublicKey]) -> int:
    """Give a budget its first approver set; return the ledger entry that records it (refused once it has one)."""
    s = approver_set_json(threshold, [raw_key(k) for k in public_keys])
    sql = ledger.db.sql

    def body(cur: Any, head: Any) -> int:
        if budget not in ledger.state.budgets:
            raise ConfigError(f"no budget {budget!r} in ledger {ledger.url}; give --cap to create it")
        if cur.execute(sql("SELECT 1 FROM budget_approvers WHERE budget = ?"), (budget,)).fetchone() is not None:
            raise ConfigError(
                f"budget {budget!r} already has approvers; changing them is itself a k-of-n change "
                "(`exfilguard budget request --approvers ... --threshold K`)"
            )
        cur.execute(sql("INSERT INTO budget_approvers (budget, threshold, keys) VALUES (?, ?, ?)"),
                    (budget, s["threshold"], json.dumps(s["keys"], separators=(",", ":"))))
        return ledger.append(cur, head, "approvers_set", budget=budget, threshold=s["threshold"], keys=s["keys"],
                             approvals=[], request=None)

    return ledger.write(body)


def apply_budget_change(
    ledger: Ledger,
    budget: str,
    *,
    nonce: str,
    expires: int,
    approvers: tuple[int, Sequence[str]],
    approvals: list[dict[str, str]],
    request: dict[str, Any],
    old_cap: int | None = None,
    new_cap: int | None = None,
    new_approvers: tuple[int, Sequence[str]] | None = None,
) -> int:
    """Apply an approved cap change (old_cap -> new_cap) or approver-set change; return its seq.

    In one transaction, on the replayed log: refuses a nonce applied before (RequestReplayed), a
    request past `expires` by the ledger's clock (RequestExpired), a budget whose approver set is
    not `approvers` or whose cap is not `old_cap` any more (RequestStale), and a cap below the
    bytes already reserved (ApprovalRefused): the new cap must hold what already left. The
    appended event is replayed like any other: its approvals are checked again (approval_check.py).
    """
    sql = ledger.db.sql

    def body(cur: Any, head: Any) -> int:
        row = cur.execute(sql("SELECT seq FROM applied_requests WHERE nonce = ?"), (nonce,)).fetchone()
        if row is not None:
            raise RequestReplayed(f"request {nonce} was applied already (ledger entry {int(row[0])}); make a new request")
        if head.now > expires:
            raise RequestExpired(f"request {nonce} expired at {_iso(expires)} (ledger time {_iso(head.now)}); make a new request")
        b = ledger.state.budgets.get(budget)
        if b is None:
            raise WrongBudget(f"no budget {budget!r} in ledger {ledger.url}: the request is for another ledger")
        if b.approvers is None:
            raise ApprovalRefused(f"budget {budget!r} has no approvers; set them once with `exfilguard budget init`")
        if (b.approvers[0], sorted(b.approvers[1])) != (approvers[0], sorted(approvers[1])):
            raise RequestStale(f"the approver set of budget {budget!r} changed since the request was made; make a new request")
        if new_approvers is None:
            if old_cap is None or new_cap is None:
                raise ValueError("a cap change needs old_cap and new_cap")
            if b.cap != old_cap:
                raise RequestStale(
                    f"budget {budget!r} has cap {b.cap} bytes now; the request was made when it was {old_cap}: make a new request"
                )
            if new_cap < b.reserved:
                raise ApprovalRefused(
                    f"cannot lower the cap of budget {budget!r} to {new_cap} bytes: {b.reserved} bytes are already "
                    f"reserved; request a cap of at least {b.reserved}"
                )
            n = cur.execute(sql("UPDATE budgets SET cap_bytes = ? WHERE name = ? AND cap_bytes = ? AND reserved_bytes = ?"),
                            (new_cap, budget, b.cap, b.reserved)).rowcount
            if n != 1:
                raise LedgerTampered(f"ledger {ledger.url}: budget {budget!r} row differs from the log (row changed)")
            seq = ledger.append(cur, head, "cap_change", budget=budget, old_cap=old_cap, new_cap=new_cap,
                                approvals=approvals, request=request)
        else:
            keys = sorted(new_approvers[1])
            cur.execute(sql("UPDATE budget_approvers SET threshold = ?, keys = ? WHERE budget = ?"),
                        (new_approvers[0], json.dumps(keys, separators=(",", ":")), budget))
            seq = ledger.append(cur, head, "approvers_set", budget=budget, threshold=new_approvers[0], keys=keys,
                                approvals=approvals, request=request)
        cur.execute(sql("INSERT INTO applied_requests (nonce, budget, seq) VALUES (?, ?, ?)"), (nonce, budget, seq))
        return seq

    return ledger.write(body)


def _iso(ts_us: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts_us / 1e6, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    st = reads.status(ledger, budget)
    current = approver_set(ledger, budget)
    if current is None:
        raise ConfigError(f"budget {budget!r} has no approvers yet; set them once with `exfilguard budget init`")
    now = int(time.time() * 1_000_000) if now is None else now
    head = reads.tree_head(ledger)
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
        if not verify_one(digest, a["public_key"], a["signature"]):
            raise RequestTampered(f"signature #{i + 1} (key {who}) does not verify: the signature file was changed")
        if a["public_key"] in seen:
            t.duplicates += 1
        elif a["public_key"] not in allowed:
            t.unknown += 1
        else:
            seen[a["public_key"]] = a["signature"]
    t.counted = [{"public_key": k, "signature": seen[k]} for k in sorted(seen)]
    return t


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
    if name not in reads.budgets(ledger):
        raise WrongBudget(f"the request is for budget {name!r}, which ledger {ledger.url} does not have")
    for i, a in enumerate(approvals):
        if a["budget"] != name:
            raise WrongBudget(f"signature #{i + 1} approves a request for budget {a['budget']!r}, not {name!r}")
    t = tally(request, approvals, request["approvers"]["keys"])
    seq = applied_request(ledger, request["nonce"])
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
        return apply_budget_change(ledger, name, old_cap=request["old_cap"], new_cap=request["new_cap"], **common)
    na = request["new_approvers"]
    return apply_budget_change(ledger, name, new_approvers=(na["threshold"], na["keys"]), **common)


def _check_history(ledger: Ledger, request: dict[str, Any]) -> None:
    """Refuse a request whose ledger head is not in this ledger's history (another ledger, or rewritten)."""
    h = request["head"]
    leaves: list[bytes] = []
    for seq, entry in reads.entries(ledger):
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

    Used offline (``audit``): the embedded request must be well formed and match the event, and its
    signatures must come from enough distinct keys of the set in force (approval_check.py, as the replay).
    """
    try:
        check_request(event.get("request"))
    except RequestTampered as exc:
        return [f"its request is malformed ({exc})"]
    return event_approval_problems(event, keys, threshold)
