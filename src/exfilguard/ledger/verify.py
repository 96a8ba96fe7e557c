"""Audit a ledger: recompute the Merkle tree from its entries, check every signed tree head
and replay the accounting. Reads only; trusts nothing the ledger says about itself."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from exfilguard.errors import LedgerUnavailable
from exfilguard.ledger import merkle
from exfilguard.ledger.events import GENESIS_PREV, decode_event
from exfilguard.ledger.keys import key_id, verify_tree_head
from exfilguard.ledger.store import Ledger, windows_from_json


@dataclass
class VerifyReport:
    """What an audit found. ``ok`` when there are no problems; ``problems[0]`` is the first."""

    tree_size: int = 0
    root: str = ""
    signed_heads: int = 0
    unsigned_tail: int = 0  # entries after the last signed head
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Res:
    budget: str
    ts: int
    amount: int
    used: int | None = None


@dataclass
class _Budget:
    cap: int
    windows: list[tuple[int, int]]
    reserved: int = 0
    outstanding: int = 0
    # per window: deque of reservation ids inside it, and their running net sum
    inside: list[deque[int]] = field(default_factory=list)
    sums: list[int] = field(default_factory=list)
    approvers: tuple[int, list[str]] | None = None  # (threshold, hex keys) once `budget init` ran


def verify_ledger(ledger: Ledger, public_keys: Sequence[Ed25519PublicKey] = ()) -> VerifyReport:
    """Check the ledger's hash chain, Merkle tree, signed tree heads and accounting invariants."""
    rep = VerifyReport()
    leaves: list[bytes] = []
    events: list[dict[str, Any] | None] = []
    prev_leaf = b""
    last_ts = 0
    seen: dict[bytes, int] = {}  # leaf hash -> position, to tell an insertion from a change
    chain: list[str] = []  # only the first break in the chain is reported: the rest follows from it
    for position, (seq, entry) in enumerate(ledger.entries()):
        if seq != position:
            if seq > position:
                chain.append(f"entry {position} is missing (deleted?): the log jumps from {position - 1} to {seq}")
            else:
                chain.append(f"entry {seq} appears twice or out of order at position {position}")
            break
        lh = merkle.leaf_hash(entry)
        try:
            ev = decode_event(entry)
        except ValueError as exc:
            chain.append(f"entry {seq} is malformed (changed?): {exc}")
            ev = None
        if ev is not None:
            want_prev = GENESIS_PREV if seq == 0 else prev_leaf.hex()
            if ev["seq"] != seq:
                chain.append(
                    f"entry at position {seq} carries seq {ev['seq']}: entries were reordered, "
                    "or an entry was inserted or deleted before it"
                )
            elif ev["prev"] != want_prev:
                back = seen.get(bytes.fromhex(ev["prev"])) if _is_hex32(ev["prev"]) else None
                if back is not None and back < seq - 1:
                    chain.append(f"entries {back + 1}..{seq - 1} were inserted: entry {seq} links back to entry {back}")
                elif seq == 0:
                    chain.append("entry 0 does not start the chain (entries before it were deleted, or it was changed)")
                else:
                    chain.append(
                        f"entry {seq - 1} was changed: entry {seq} records a different hash for it "
                        f"(or entry {seq} itself was inserted or changed)"
                    )
            if not isinstance(ev["ts"], int) or ev["ts"] < last_ts:
                chain.append(f"entry {seq} goes back in time (ts {ev['ts']} < {last_ts})")
            else:
                last_ts = ev["ts"]
        seen[lh] = position
        leaves.append(lh)
        events.append(ev)
        prev_leaf = lh
    rep.problems.extend(chain[:1])
    n = len(leaves)
    rep.tree_size = n
    root = merkle.root(leaves)
    rep.root = root.hex()

    # The head row is a cache of the tree; it must agree with the entries.
    size, frontier, _ts, last_leaf = ledger.head_row()
    if size != n:
        rep.problems.append(
            f"the ledger head says {size} entries but {n} are stored"
            + (f": entries {n}..{size - 1} were deleted" if size > n else ": entries were inserted")
        )
    elif merkle.frontier_root(frontier) != root:
        rep.problems.append("the ledger head's root does not match the tree recomputed from the entries (an entry changed)")

    _check_heads(ledger, public_keys, leaves, events, rep)
    _check_accounting(ledger, events, rep)
    return rep


def _check_heads(
    ledger: Ledger, public_keys: Sequence[Ed25519PublicKey], leaves: list[bytes], events: list[Any], rep: VerifyReport
) -> None:
    keys = {key_id(k): k for k in public_keys}
    heads = ledger.tree_heads()
    n = len(leaves)
    roots: dict[int, bytes] = {}
    last_size = 0
    for i, h in enumerate(heads):
        k = keys.get(h.key_id)
        if k is None:
            rep.problems.append(f"signed tree head #{i} (size {h.tree_size}) is signed by unknown key {h.key_id}")
            continue
        if not verify_tree_head(k, h):
            rep.problems.append(f"signed tree head #{i} (size {h.tree_size}) has a bad signature (head changed)")
            continue
        if h.tree_size > n:
            rep.problems.append(
                f"signed tree head #{i} covers {h.tree_size} entries but only {n} are stored: entries {n}..{h.tree_size - 1} deleted"
            )
            continue
        if h.tree_size not in roots:
            roots[h.tree_size] = merkle.root(leaves[: h.tree_size])
        if roots[h.tree_size] != h.root:
            lo = max((s for s in roots if s < h.tree_size and roots[s] is not None), default=0)
            rep.problems.append(
                f"signed tree head #{i} (size {h.tree_size}) does not match the entries: "
                f"an entry in {lo}..{h.tree_size - 1} was changed, inserted, deleted or moved"
            )
            continue
        if h.tree_size < last_size:
            rep.problems.append(f"signed tree head #{i} is older than the head before it (size {h.tree_size} < {last_size})")
        last_size = max(last_size, h.tree_size)
        rep.signed_heads += 1
    rep.unsigned_tail = n - last_size
    if not heads:
        rep.notes.append("no signed tree heads: the log is self-consistent but nobody vouches for it")
    elif rep.unsigned_tail:
        rep.notes.append(f"{rep.unsigned_tail} entries after the last signed head are not covered by a signature")


def _check_accounting(ledger: Ledger, events: list[Any], rep: VerifyReport) -> None:
    budgets: dict[str, _Budget] = {}
    res: dict[int, _Res] = {}
    order: dict[str, list[int]] = {}
    nonces: dict[str, tuple[str, int]] = {}  # nonce of every applied budget change -> (budget, seq)

    def bad(seq: int, msg: str) -> None:
        rep.problems.append(f"entry {seq}: {msg}")

    for ev in events:
        if ev is None:
            continue
        seq, kind, name = ev["seq"], ev["kind"], ev.get("budget")
        if kind == "budget_created":
            if name in budgets:
                bad(seq, f"budget {name!r} created twice")
                continue
            ws = [(int(s), int(lim)) for s, lim in ev["windows"]]
            budgets[name] = _Budget(int(ev["cap"]), ws, inside=[deque() for _ in ws], sums=[0] * len(ws))
            order[name] = []
            continue
        b = budgets.get(name)
        if b is None:
            bad(seq, f"{kind} for budget {name!r} before it was created")
            continue
        if kind == "reserve":
            amount = ev["amount"]
            if not isinstance(amount, int) or amount <= 0:
                bad(seq, f"reservation of {amount!r} bytes")
                continue
            b.reserved += amount
            b.outstanding += amount
            if ev["reserved"] != b.reserved:
                bad(seq, f"records {ev['reserved']} bytes reserved, the log adds up to {b.reserved}")
                b.reserved = ev["reserved"] if isinstance(ev["reserved"], int) else b.reserved
            if b.reserved > b.cap:
                bad(seq, f"reserves past the cap: {b.reserved} > {b.cap}")
            res[seq] = _Res(name, ev["ts"], amount)
            for i, (secs, limit) in enumerate(b.windows):
                q = b.inside[i]
                while q and res[q[0]].ts <= ev["ts"] - secs * 1_000_000:
                    r = res[q.popleft()]
                    b.sums[i] -= r.amount if r.used is None else r.used
                q.append(seq)
                b.sums[i] += amount
                if b.sums[i] > limit:
                    bad(seq, f"reserves past the {secs}s window: {b.sums[i]} > {limit}")
        elif kind == "release":
            r = res.get(ev["res"])
            if r is None or r.budget != name:
                bad(seq, f"releases unknown reservation {ev['res']}")
                continue
            if r.used is not None:
                bad(seq, f"releases reservation {ev['res']} a second time")
                continue
            used = ev["used"]
            if not isinstance(used, int) or not 0 <= used <= r.amount or ev["returned"] != r.amount - used:
                bad(seq, f"settles reservation {ev['res']} of {r.amount} bytes at {used!r}, returning {ev['returned']!r}")
                continue
            r.used = used
            b.reserved -= r.amount - used
            b.outstanding -= r.amount
            for i in range(len(b.windows)):
                if ev["res"] in b.inside[i]:
                    b.sums[i] -= r.amount - used
            if ev["reserved"] != b.reserved:
                bad(seq, f"records {ev['reserved']} bytes reserved, the log adds up to {b.reserved}")
        elif kind in ("cap_change", "approvers_set"):
            _check_change(ev, b, nonces, bad)

    # The tables the meter reads must agree with the log it wrote.
    rows = {r[0]: r for r in ledger.budget_rows()}
    for name, b in budgets.items():
        row = rows.pop(name, None)
        if row is None:
            rep.problems.append(f"budget {name!r} is in the log but not in the budgets table (row deleted)")
            continue
        _, cap, reserved, outstanding, wjson = row
        if (cap, reserved, outstanding) != (b.cap, b.reserved, b.outstanding):
            rep.problems.append(
                f"budget {name!r} row says cap={cap} reserved={reserved} outstanding={outstanding}, "
                f"the log says cap={b.cap} reserved={b.reserved} outstanding={b.outstanding} (row changed)"
            )
        if sorted(tuple(w) for w in json.loads(wjson)) != sorted(b.windows):
            rep.problems.append(f"budget {name!r} row's windows differ from the log's (row changed)")
    for name in rows:
        rep.problems.append(f"budget {name!r} is in the budgets table but was never created in the log (row inserted)")
    try:
        approver_rows = {r[0]: (r[1], r[2]) for r in ledger.approver_rows()}
        applied = {r[0]: (r[1], r[2]) for r in ledger.applied_request_rows()}
    except LedgerUnavailable:
        # a ledger made before k-of-n changes existed, opened read-only, lacks these tables
        approver_rows, applied = {}, {}
    for name, b in budgets.items():
        if approver_rows.pop(name, None) != b.approvers:
            rep.problems.append(f"budget {name!r}'s approver set in the table differs from the log's (row changed)")
    for name in approver_rows:
        rep.problems.append(f"approvers of budget {name!r} are in the table but were never set in the log (row inserted)")
    if applied != nonces:
        rep.problems.append("the applied-requests table differs from the budget changes in the log (row changed): "
                            "a request could be replayed")
    stored = {r[0]: r for r in ledger.reservation_rows()}
    for rid, r in res.items():
        row = stored.pop(rid, None)
        if row is None:
            rep.problems.append(f"reservation {rid} is in the log but not in the reservations table (row deleted)")
        elif (row[1], row[2], row[3], row[4]) != (r.budget, r.ts, r.amount, r.used):
            rep.problems.append(f"reservation {rid} row differs from the log (row changed)")
    for rid in stored:
        rep.problems.append(f"reservation {rid} is in the reservations table but not in the log (row inserted)")


def _is_hex32(text: object) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _check_change(ev: dict[str, Any], b: _Budget, nonces: dict[str, tuple[str, int]], bad: Any) -> None:
    """Replay a k-of-n budget change: re-check its approvals' signatures against the set in force."""
    from exfilguard.ledger.approvals import approver_set_json, check_event_approvals

    seq, kind = ev["seq"], ev["kind"]
    if kind == "approvers_set" and b.approvers is None and ev["request"] is None:
        try:  # the first set of a budget (`budget init`) needs no approvals
            s = approver_set_json(ev["threshold"], ev["keys"])
        except Exception as exc:  # noqa: BLE001 - anything malformed is a finding
            bad(seq, f"sets an unusable approver set ({exc})")
            return
        if ev["approvals"] != [] or s["keys"] != ev["keys"]:
            bad(seq, "first approver set is not in canonical form")
        b.approvers = (s["threshold"], s["keys"])
        return
    if b.approvers is None:
        bad(seq, f"{kind} for budget {ev['budget']!r} before it had approvers")
        return
    problems = check_event_approvals(ev, b.approvers[1], b.approvers[0])
    req = ev["request"] if isinstance(ev["request"], dict) else {}
    nonce = req.get("nonce")
    if nonce in nonces:
        problems.append(f"its request was applied before (entry {nonces[nonce][1]}): replayed")
    for p in problems:
        bad(seq, f"{kind}: {p}")
    if problems:
        return
    nonces[nonce] = (ev["budget"], seq)
    if kind == "cap_change":
        if ev["old_cap"] != b.cap:
            bad(seq, f"changes the cap from {ev['old_cap']} but the log says it was {b.cap}")
        if ev["new_cap"] < b.reserved:
            bad(seq, f"lowers the cap to {ev['new_cap']} below the {b.reserved} bytes reserved")
        b.cap = ev["new_cap"]
    else:
        b.approvers = (ev["threshold"], sorted(ev["keys"]))
