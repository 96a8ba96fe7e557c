"""Replay the event log into the budgets and reservations it implies: the one place that says
what each event kind does to the accounting.

The log is the ledger; the ``budgets`` and ``reservations`` tables are a cache of it that the
database uses for its CHECK constraints. Both the offline audit (``verify_ledger``) and the
meter (at open, and before every debit) derive the totals here and compare the cache with them,
so a changed summary row can never lend bytes the log does not have.

To add an event kind: write a handler ``(state, event) -> None`` and add it to ``HANDLERS``
(and the kind's fields to ``events.KINDS``). A handler reports what does not add up with
``state.bad(seq, message)`` and must leave the state usable.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ResState:
    """One reservation as the log tells it."""

    budget: str
    ts: int
    amount: int
    used: int | None = None


@dataclass
class BudgetState:
    """One budget as the log tells it: cap, windows and the running totals."""

    cap: int
    windows: list[tuple[int, int]]
    reserved: int = 0
    outstanding: int = 0
    # per window: reservation ids inside it (oldest first), the same as a set, and their net sum
    inside: list[deque[int]] = field(default_factory=list)
    members: list[set[int]] = field(default_factory=list)
    sums: list[int] = field(default_factory=list)
    approvers: tuple[int, list[str]] | None = None  # (threshold, hex keys) once `budget init` ran


@dataclass
class LedgerState:
    """The accounting the log adds up to after `size` events; `problems` lists what did not add up."""

    budgets: dict[str, BudgetState] = field(default_factory=dict)
    reservations: dict[int, ResState] = field(default_factory=dict)
    size: int = 0
    problems: list[str] = field(default_factory=list)
    nonces: dict[str, tuple[str, int]] = field(default_factory=dict)  # applied budget change -> (budget, seq)

    def bad(self, seq: int, msg: str) -> None:
        self.problems.append(f"entry {seq}: {msg}")

    def apply(self, event: dict[str, Any]) -> None:
        """Apply one decoded event (in log order)."""
        handler = HANDLERS.get(event["kind"])
        if handler is None:  # decode_event refuses unknown kinds; a kind without a handler is a bug here
            self.bad(event["seq"], f"no replay rule for event kind {event['kind']!r}")
        else:
            handler(self, event)
        self.size = event["seq"] + 1

    def window_used(self, name: str, now: int) -> list[int]:
        """Bytes counted in each of the budget's windows at time `now` (µs; never decreasing)."""
        b = self.budgets[name]
        for i, (secs, _limit) in enumerate(b.windows):
            q = b.inside[i]
            while q and self.reservations[q[0]].ts <= now - secs * 1_000_000:
                rid = q.popleft()
                b.members[i].discard(rid)
                r = self.reservations[rid]
                b.sums[i] -= r.amount if r.used is None else r.used
        return list(b.sums)

    def budget(self, seq: int, event: dict[str, Any]) -> BudgetState | None:
        b = self.budgets.get(event.get("budget"))  # type: ignore[arg-type]
        if b is None:
            self.bad(seq, f"{event['kind']} for budget {event.get('budget')!r} before it was created")
        return b


def _budget_created(st: LedgerState, ev: dict[str, Any]) -> None:
    seq, name = ev["seq"], ev["budget"]
    if name in st.budgets:
        st.bad(seq, f"budget {name!r} created twice")
        return
    ws = [(int(s), int(lim)) for s, lim in ev["windows"]]
    st.budgets[name] = BudgetState(
        int(ev["cap"]), ws, inside=[deque() for _ in ws], members=[set() for _ in ws], sums=[0] * len(ws)
    )


def _reserve(st: LedgerState, ev: dict[str, Any]) -> None:
    seq = ev["seq"]
    b = st.budget(seq, ev)
    if b is None:
        return
    amount = ev["amount"]
    if not isinstance(amount, int) or amount <= 0:
        st.bad(seq, f"reservation of {amount!r} bytes")
        return
    b.reserved += amount
    b.outstanding += amount
    if ev["reserved"] != b.reserved:
        st.bad(seq, f"records {ev['reserved']} bytes reserved, the log adds up to {b.reserved}")
    if b.reserved > b.cap:
        st.bad(seq, f"reserves past the cap: {b.reserved} > {b.cap}")
    st.reservations[seq] = ResState(ev["budget"], ev["ts"], amount)
    sums = st.window_used(ev["budget"], ev["ts"])
    for i, (secs, limit) in enumerate(b.windows):
        b.inside[i].append(seq)
        b.members[i].add(seq)
        b.sums[i] += amount
        if sums[i] + amount > limit:
            st.bad(seq, f"reserves past the {secs}s window: {b.sums[i]} > {limit}")


def _release(st: LedgerState, ev: dict[str, Any]) -> None:
    seq = ev["seq"]
    b = st.budget(seq, ev)
    if b is None:
        return
    r = st.reservations.get(ev["res"]) if isinstance(ev["res"], int) else None
    if r is None or r.budget != ev["budget"]:
        st.bad(seq, f"releases unknown reservation {ev['res']}")
        return
    if r.used is not None:
        st.bad(seq, f"releases reservation {ev['res']} a second time")
        return
    used = ev["used"]
    if not isinstance(used, int) or not 0 <= used <= r.amount or ev["returned"] != r.amount - used:
        st.bad(seq, f"settles reservation {ev['res']} of {r.amount} bytes at {used!r}, returning {ev['returned']!r}")
        return
    r.used = used
    b.reserved -= r.amount - used
    b.outstanding -= r.amount
    for i in range(len(b.windows)):
        if ev["res"] in b.members[i]:
            b.sums[i] -= r.amount - used
    if ev["reserved"] != b.reserved:
        st.bad(seq, f"records {ev['reserved']} bytes reserved, the log adds up to {b.reserved}")


def _budget_change(st: LedgerState, ev: dict[str, Any]) -> None:
    """A k-of-n budget change (cap_change, approvers_set): re-check its approvals against the set in force."""
    from exfilguard.ledger.approvals import approver_set_json, check_event_approvals

    seq, kind = ev["seq"], ev["kind"]
    b = st.budget(seq, ev)
    if b is None:
        return
    if kind == "approvers_set" and b.approvers is None and ev["request"] is None:
        try:  # the first set of a budget (`budget init`) needs no approvals
            s = approver_set_json(ev["threshold"], ev["keys"])
        except Exception as exc:  # noqa: BLE001 - anything malformed is a finding
            st.bad(seq, f"sets an unusable approver set ({exc})")
            return
        if ev["approvals"] != [] or s["keys"] != ev["keys"]:
            st.bad(seq, "first approver set is not in canonical form")
        b.approvers = (s["threshold"], s["keys"])
        return
    if b.approvers is None:
        st.bad(seq, f"{kind} for budget {ev['budget']!r} before it had approvers")
        return
    problems = check_event_approvals(ev, b.approvers[1], b.approvers[0])
    req = ev["request"] if isinstance(ev["request"], dict) else {}
    nonce = req.get("nonce")
    if nonce in st.nonces:
        problems.append(f"its request was applied before (entry {st.nonces[nonce][1]}): replayed")
    for p in problems:
        st.bad(seq, f"{kind}: {p}")
    if problems:
        return
    st.nonces[nonce] = (ev["budget"], seq)
    if kind == "cap_change":
        if ev["old_cap"] != b.cap:
            st.bad(seq, f"changes the cap from {ev['old_cap']!r}, but the log's cap is {b.cap}")
        if not isinstance(ev["new_cap"], int) or ev["new_cap"] < b.reserved:
            st.bad(seq, f"lowers the cap to {ev['new_cap']!r} below the {b.reserved} bytes reserved")
            return
        b.cap = ev["new_cap"]
    else:
        b.approvers = (ev["threshold"], sorted(ev["keys"]))


def _budget_only(st: LedgerState, ev: dict[str, Any]) -> None:
    st.budget(ev["seq"], ev)


# kind -> what it does to the accounting. One place: the meter and the audit both use it.
HANDLERS: dict[str, Callable[[LedgerState, dict[str, Any]], None]] = {
    "budget_created": _budget_created,
    "reserve": _reserve,
    "release": _release,
    "deny": _budget_only,
    "cap_change": _budget_change,
    "approvers_set": _budget_change,
    "meter_start": _budget_only,
    "meter_stop": _budget_only,
    # API keys (ledger/apikeys.py): bookkeeping on the key's own budget; no totals change
    "key_added": _budget_only,
    "key_revoked": _budget_only,
    "key_overrun": _budget_only,
}


def budget_row_problems(
    st: LedgerState, rows: Iterable[tuple[str, int, int, int, str]], names: Iterable[str] | None = None
) -> list[str]:
    """Compare ``budgets`` rows (name, cap, reserved, outstanding, windows json) with the log.

    With `names`, only those budgets are compared (the rest of the table is not read)."""
    out: list[str] = []
    by_name = {r[0]: r for r in rows}
    wanted = list(st.budgets) if names is None else list(names)
    for name in wanted:
        b = st.budgets.get(name)
        row = by_name.pop(name, None)
        if b is None:
            if row is not None:
                out.append(f"budget {name!r} is in the budgets table but was never created in the log (row inserted)")
            continue
        if row is None:
            out.append(f"budget {name!r} is in the log but not in the budgets table (row deleted)")
            continue
        _, cap, reserved, outstanding, wjson = row
        if (cap, reserved, outstanding) != (b.cap, b.reserved, b.outstanding):
            out.append(
                f"budget {name!r} row says cap={cap} reserved={reserved} outstanding={outstanding}, "
                f"the log says cap={b.cap} reserved={b.reserved} outstanding={b.outstanding} (row changed)"
            )
        if sorted(tuple(w) for w in json.loads(wjson)) != sorted(b.windows):
            out.append(f"budget {name!r} row's windows differ from the log's (row changed)")
    if names is None:
        for name in by_name:
            out.append(f"budget {name!r} is in the budgets table but was never created in the log (row inserted)")
    return out


def reservation_row_problems(st: LedgerState, rows: Iterable[tuple[int, str, int, int, int | None]]) -> list[str]:
    """Compare every ``reservations`` row (id, budget, ts, amount, used) with the log."""
    out: list[str] = []
    stored = {r[0]: r for r in rows}
    for rid, r in st.reservations.items():
        row = stored.pop(rid, None)
        if row is None:
            out.append(f"reservation {rid} is in the log but not in the reservations table (row deleted)")
        elif (row[1], row[2], row[3], row[4]) != (r.budget, r.ts, r.amount, r.used):
            out.append(f"reservation {rid} row differs from the log (row changed)")
    for rid in stored:
        out.append(f"reservation {rid} is in the reservations table but not in the log (row inserted)")
    return out
