"""Audit a ledger: recompute the Merkle tree from its entries, check every signed tree head
and replay the accounting. Reads only; trusts nothing the ledger says about itself."""

from __future__ import annotations

import json
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from exfilguard.errors import LedgerUnavailable
from exfilguard.ledger.storage import one_line
from exfilguard.ledger import reads
from exfilguard.ledger import merkle
from exfilguard.ledger.events import GENESIS_PREV, decode_event
from exfilguard.ledger.keys import TreeHead, key_id
from exfilguard.ledger.keytools import verify_tree_head
from exfilguard.ledger.accounting import LedgerState, budget_row_problems, reservation_row_problems
from exfilguard.ledger.store import Ledger


HEAD_GRACE_S = 10.0  # how much older than --sth-interval an unsigned tail may be before it is a problem


@dataclass
class VerifyReport:
    """What an audit found. ``ok`` when there are no problems; ``problems[0]`` is the first."""

    tree_size: int = 0
    root: str = ""
    signed_heads: int = 0
    unsigned_tail: int = 0  # entries after the last signed head
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    state: LedgerState | None = None  # the accounting the log adds up to
    last_ts: int = 0  # the last entry's timestamp
    trusted_heads: int = 0  # heads kept outside the ledger that it was checked against
    unchecked_heads: int = 0  # signed heads in the ledger not checked: no public key was given
    # Head freshness, not tampering: the unsigned tail is younger than --sth-interval + HEAD_GRACE_S,
    # so a running meter's next head will cover it (in about `next_head_in_s` seconds).
    pending_entries: int = 0
    next_head_in_s: float | None = None
    # Without a trusted head (kept outside the ledger), a rollback to an earlier signed head passes.
    rollback_detectable: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_ledger(
    ledger: Ledger,
    public_keys: Sequence[Ed25519PublicKey] = (),
    trusted: Sequence[TreeHead] = (),
    *,
    check_heads: bool = True,
    sth_interval: float = 30.0,
    now: float | None = None,
) -> VerifyReport:
    """Check the ledger's hash chain, Merkle tree, signed tree heads and accounting invariants.

    `trusted` are heads saved outside the ledger (``ledger checkpoint``, ``meter
    --publish-heads``), their signatures already checked: the ledger must hold at least their
    entries, with their root; without one, a rollback to an earlier signed head cannot be told
    (``rollback_detectable`` False, and a note says so). With `public_keys`, the last entry must be
    covered by a signed head once it is older than `sth_interval` + HEAD_GRACE_S (a log truncated
    to before its last heads, or stripped of them, fails); a younger unsigned tail is pending
    (``pending_entries``, ``next_head_in_s``), not a problem: the meter signs every `sth_interval`.
    """
    with snapshot(ledger):
        rep = _verify(ledger, public_keys, trusted, check_heads, sth_interval, time.time() if now is None else now)
    rep.rollback_detectable = bool(trusted) and rep.trusted_heads == len(trusted)
    if not trusted:
        rep.notes.append("no trusted head given (--trusted-head, e.g. the meter's --publish-heads directory): "
                         "a rollback to an earlier signed head cannot be detected")
    return rep


def _verify(
    ledger: Ledger, public_keys: Sequence[Ed25519PublicKey], trusted: Sequence[TreeHead], check_heads: bool,
    sth_interval: float, now: float,
) -> VerifyReport:
    rep = VerifyReport()
    leaves: list[bytes] = []
    events: list[dict[str, Any] | None] = []
    prev_leaf = b""
    last_ts = 0
    seen: dict[bytes, int] = {}  # leaf hash -> position, to tell an insertion from a change
    chain: list[str] = []  # only the first break in the chain is reported: the rest follows from it
    for position, (seq, entry) in enumerate(reads.entries(ledger)):
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
    size, frontier = reads.query(ledger, "SELECT tree_size, frontier FROM ledger_head WHERE id = 1")[0]
    size, frontier = int(size), [bytes(frontier)[i : i + 32] for i in range(0, len(bytes(frontier)), 32)]
    if size != n:
        rep.problems.append(
            f"the ledger head says {size} entries but {n} are stored"
            + (f": entries {n}..{size - 1} were deleted" if size > n else ": entries were inserted")
        )
    elif merkle.frontier_root(frontier) != root:
        rep.problems.append("the ledger head's root does not match the tree recomputed from the entries (an entry changed)")

    rep.last_ts = last_ts
    _check_trusted(trusted, leaves, rep)
    if check_heads:
        _check_heads(ledger, public_keys, leaves, events, rep, sth_interval, now)
    _check_accounting(ledger, events, rep)
    return rep


def _check_trusted(trusted: Sequence[TreeHead], leaves: list[bytes], rep: VerifyReport) -> None:
    """The ledger must extend every head saved outside it: not shorter, same root at that size."""
    n = len(leaves)
    for h in trusted:
        if h.tree_size > n:
            rep.problems.append(
                f"the trusted head of {h.tree_size} entries (saved outside the ledger) covers more than the "
                f"{n} the ledger holds: entries {n}..{h.tree_size - 1} were deleted (rolled back)"
            )
        elif merkle.root(leaves[: h.tree_size]) != h.root:
            rep.problems.append(
                f"the ledger's first {h.tree_size} entries do not have the root of the trusted head of that size "
                "(saved outside the ledger): the log was rewritten"
            )
        else:
            rep.trusted_heads += 1


def _check_heads(
    ledger: Ledger, public_keys: Sequence[Ed25519PublicKey], leaves: list[bytes], events: list[Any], rep: VerifyReport,
    sth_interval: float, now: float,
) -> None:
    keys = {key_id(k): k for k in public_keys}
    heads = reads.tree_heads(ledger)
    n = len(leaves)
    if not public_keys:
        if heads:
            rep.unchecked_heads = len(heads)
            rep.notes.append(f"{len(heads)} signed tree heads not checked: no public key given")
        else:
            rep.notes.append("no signed tree heads: the log is self-consistent but nobody vouches for it")
        rep.unsigned_tail = n
        return
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
    if not heads and n:
        # With a key, an unsigned ledger is what deleting every head leaves behind.
        rep.problems.append(
            f"no signed tree heads, but a public key was given: nothing vouches for the {n} entries "
            "(heads deleted, or the meter ran without --signing-key)"
        )
    elif rep.unsigned_tail:
        first = events[last_size]
        age = now - first["ts"] / 1e6 if isinstance(first, dict) and isinstance(first.get("ts"), int) else float("inf")
        if age <= sth_interval + HEAD_GRACE_S:
            last_head = max((h.ts for h in heads if h.tree_size == last_size), default=0) / 1e6
            rep.pending_entries = rep.unsigned_tail
            rep.next_head_in_s = max(0.0, last_head + sth_interval - now) if last_head else 0.0
            rep.notes.append(f"{rep.unsigned_tail} entries not yet signed (next head in {rep.next_head_in_s:.0f} s): "
                             "the meter signs every --sth-interval, at rest and at stop")
        else:
            rep.problems.append(
                f"the last {rep.unsigned_tail} entries are not covered by a signed tree head, the oldest for {age:.0f} s, "
                f"longer than --sth-interval {sth_interval:g} s + {HEAD_GRACE_S:g} s: the meter stopped without its final "
                "head (killed), or the log was truncated and its later heads deleted"
            )


def _check_accounting(ledger: Ledger, events: list[Any], rep: VerifyReport) -> None:
    """Replay the log (ledger/accounting.py) and compare the tables the meter reads with it."""
    st = LedgerState()
    for ev in events:
        if ev is not None:
            st.apply(ev)
    rep.problems.extend(st.problems)
    brows = reads.query(ledger, "SELECT name, cap_bytes, reserved_bytes, outstanding_bytes, windows FROM budgets ORDER BY name")
    rrows = reads.query(ledger, "SELECT id, budget, ts, amount, used FROM reservations ORDER BY id")
    rep.problems.extend(budget_row_problems(st, [(r[0], int(r[1]), int(r[2]), int(r[3]), r[4]) for r in brows]))
    rep.problems.extend(reservation_row_problems(
        st, [(int(a), b, int(c), int(d), None if e is None else int(e)) for a, b, c, d, e in rrows]))
    rep.problems.extend(_approval_row_problems(ledger, st))
    rep.state = st


def _approval_row_problems(ledger: Ledger, st: LedgerState) -> list[str]:
    """Compare the approver-set and applied-request tables (k-of-n changes) with the log."""
    out: list[str] = []
    try:
        approver_rows = {r[0]: (int(r[1]), list(json.loads(r[2])))
                         for r in reads.query(ledger, "SELECT budget, threshold, keys FROM budget_approvers ORDER BY budget")}
        applied = {r[0]: (r[1], int(r[2])) for r in reads.query(ledger, "SELECT nonce, budget, seq FROM applied_requests ORDER BY seq")}
    except LedgerUnavailable:
        # a ledger made before k-of-n changes existed, opened read-only, lacks these tables
        approver_rows, applied = {}, {}
    for name, b in st.budgets.items():
        if approver_rows.pop(name, None) != b.approvers:
            out.append(f"budget {name!r}'s approver set in the table differs from the log's (row changed)")
    for name in approver_rows:
        out.append(f"approvers of budget {name!r} are in the table but were never set in the log (row inserted)")
    if applied != st.nonces:
        out.append("the applied-requests table differs from the budget changes in the log (row changed): "
                   "a request could be replayed")
    return out


def _is_hex32(text: object) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


@contextlib.contextmanager
def snapshot(ledger: Ledger) -> Iterator[None]:
    """Make the reads inside see one consistent state, while writers keep appending meanwhile."""
    db = ledger.db
    if db.in_snapshot:
        yield
        return
    try:
        db.begin_snapshot()
    except db.errors as exc:
        db.broken()
        raise LedgerUnavailable(f"ledger {ledger.url} cannot be read: {one_line(exc)}") from None
    db.in_snapshot = True
    try:
        yield
    finally:
        db.in_snapshot = False
        with contextlib.suppress(Exception):
            db.end_snapshot()
