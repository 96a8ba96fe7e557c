"""The accounting rules, pure: what each event does to a budget, and what a reservation may be granted.

No I/O. The log is the ledger: ``LedgerState.apply`` replays it event by event (``HANDLERS``:
kind -> rule), and ``grantable`` decides how many bytes a reservation gets from the replayed
state. The meter's ledger (store.py) decides every reserve, release and settlement with these
functions and then appends the event, which the same rules apply; ``ledger verify`` replays the
log with them. Nothing else decides whether a byte may pass.

Invariants a replay checks (``state.problems``, one line each): a budget is created once
before use; a reservation is positive, its ``reserved`` is the running debit, and the debit
never exceeds the cap nor any window's limit; a release settles an open reservation of its
budget once, at 0 <= used <= amount, returning the rest; a cap change carries enough valid
approvals (approval_check.py) and never drops below what is reserved.

To add an event kind: a rule ``(state, event) -> None`` in ``HANDLERS`` (and its fields in
``events.KINDS``); it reports what does not add up with ``state.bad`` and leaves the state usable.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from exfilguard.ledger.approval_check import event_approval_problems


@dataclass(frozen=True)
class Window:
    """A rolling window: at most `limit` bytes reserved in any `seconds`-long interval."""

    seconds: int
    limit: int

    def label(self) -> str:
        return f"{self.seconds}s"


@dataclass(frozen=True)
class Grant:
    """The answer to a reservation: `granted` bytes (0 when denied) under reservation `res`."""

    res: int | None
    granted: int
    reserved_after: int
    remaining: int
    reason: str = ""  # why fewer bytes than asked: "cap" or "window:<seconds>s"


@dataclass(frozen=True)
class BudgetStatus:
    """One budget as the ledger sees it (``ledger status``)."""

    budget: str
    cap_bytes: int
    used_bytes: int  # the debit: settled reservations at what they forwarded, open ones in full
    reserved_bytes: int  # the same figure, named as the row names it
    remaining_bytes: int
    forwarded_bytes: int  # what settled reservations say was forwarded: at rest, what left
    outstanding_bytes: int  # open reservations, in full
    tree_size: int
    root: str
    windows: list[dict[str, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def windows_to_json(windows: Sequence[Window]) -> str:
    return json.dumps(sorted([w.seconds, w.limit] for w in windows), separators=(",", ":"))


def windows_from_json(text: str) -> list[Window]:
    return [Window(int(s), int(n)) for s, n in json.loads(text)]


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
    reserved: int = 0  # the debit against the cap: settled reservations at `used`, open ones in full
    outstanding: int = 0  # open reservations, in full
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
        if handler is None:  # decode_event refuses unknown kinds; a kind without a rule is a bug here
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

    def window_usage(self, name: str, now: int) -> list[int]:
        """What window_used says at `now`, without dropping anything (`now` may be another clock's)."""
        b, out = self.budgets[name], []
        for i, (secs, _limit) in enumerate(b.windows):
            s = b.sums[i]
            for rid in b.inside[i]:
                r = self.reservations[rid]
                if r.ts > now - secs * 1_000_000:
                    break
                s -= r.amount if r.used is None else r.used
            out.append(s)
        return out

    def budget(self, seq: int, event: dict[str, Any]) -> BudgetState | None:
        b = self.budgets.get(event.get("budget"))  # type: ignore[arg-type]
        if b is None:
            self.bad(seq, f"{event['kind']} for budget {event.get('budget')!r} before it was created")
        return b


# -- deciding: what a reservation may get, and whether a settlement is valid ----------------
def grantable(want: int, cap: int, reserved: int, windows: Sequence[Window], usage: Sequence[int]) -> tuple[int, str]:
    """How many of `want` bytes the cap and every window (with `usage` bytes counted in it) allow,
    and what limited the grant ("" when nothing did)."""
    grant, reason = min(want, cap - reserved), "cap" if cap - reserved < want else ""
    for w, used in zip(windows, usage):
        room = max(0, w.limit - used)
        if room < grant:
            grant, reason = room, f"window:{w.label()}"
    return grant, reason


def decide_reserve(st: LedgerState, budget: str, want: int, now: int) -> tuple[int, str]:
    """The grant for `want` bytes of `budget` at time `now` on the replayed state (0: denied) and why."""
    if want <= 0:
        raise ValueError("a reservation is for a positive number of bytes")
    b = st.budgets[budget]
    windows = [Window(s, n) for s, n in b.windows]
    return grantable(want, b.cap, b.reserved, windows, st.window_used(budget, now))


def check_release(st: LedgerState, res: int, used: int) -> ResState:
    """The open reservation `res` that may settle at `used` bytes; ValueError when it cannot."""
    r = st.reservations.get(res)
    if r is None:
        raise ValueError(f"no reservation {res}")
    if r.used is not None:
        raise ValueError(f"reservation {res} is already settled")
    if not 0 <= used <= r.amount:
        raise ValueError(f"reservation {res} of {r.amount} bytes cannot settle at {used}")
    return r


def check_settlement(st: LedgerState, releases: Sequence[tuple[int, int]]) -> None:
    """Validate every (reservation, used) of one settlement before any is applied; ValueError if one cannot."""
    if len({res for res, _ in releases}) != len(releases):
        raise ValueError("a reservation appears twice in one settlement")
    for res, used in releases:
        check_release(st, res, used)


def replayed_status(st: LedgerState, name: str, now: int, tree_size: int, root: str) -> BudgetStatus:
    """A budget's totals as the replayed log says at time `now` (µs)."""
    b = st.budgets[name]
    wins = [{"seconds": s, "limit_bytes": lim, "used_bytes": u, "remaining_bytes": max(0, lim - u)}
            for (s, lim), u in zip(b.windows, st.window_usage(name, now))]
    return BudgetStatus(budget=name, cap_bytes=b.cap, used_bytes=b.reserved, reserved_bytes=b.reserved,
                        remaining_bytes=b.cap - b.reserved, forwarded_bytes=b.reserved - b.outstanding,
                        outstanding_bytes=b.outstanding, tree_size=tree_size, root=root, windows=wins)


# -- the rules: what each event kind does to the state ---------------------------------------
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


def _first_approvers_ok(ev: dict[str, Any]) -> bool:
    """A budget's first approver set (`budget init`): 1..64 distinct sorted keys, 1 <= threshold <= n, no approvals."""
    keys, k = ev["keys"], ev["threshold"]
    return (isinstance(keys, list) and 1 <= len(keys) <= 64 and all(isinstance(x, str) for x in keys)
            and keys == sorted(set(keys)) and isinstance(k, int) and not isinstance(k, bool)
            and 1 <= k <= len(keys) and ev["approvals"] == [])


def _budget_change(st: LedgerState, ev: dict[str, Any]) -> None:
    """A k-of-n budget change (cap_change, approvers_set): re-check its approvals against the set in force."""
    seq, kind = ev["seq"], ev["kind"]
    b = st.budget(seq, ev)
    if b is None:
        return
    if kind == "approvers_set" and b.approvers is None and ev["request"] is None:
        if not _first_approvers_ok(ev):
            st.bad(seq, "first approver set is not in canonical form")
            return
        b.approvers = (ev["threshold"], list(ev["keys"]))
        return
    if b.approvers is None:
        st.bad(seq, f"{kind} for budget {ev['budget']!r} before it had approvers")
        return
    problems = event_approval_problems(ev, b.approvers[1], b.approvers[0])
    req = ev["request"] if isinstance(ev["request"], dict) else {}
    nonce = req.get("nonce")
    if not isinstance(nonce, str):
        problems.append("its request has no nonce")
    elif nonce in st.nonces:
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


# -- the tables are a cache of the log: what differs ----------------------------------------
def budget_row_problems(
    st: LedgerState, rows: Iterable[tuple[str, int, int, int, str]], names: Iterable[str] | None = None
) -> list[str]:
    """Compare ``budgets`` rows (name, cap, reserved, outstanding, windows json) with the log.

    With `names`, only those budgets are compared (the rest of the table is not read)."""
    out: list[str] = []
    by_name = {r[0]: r for r in rows}
    for name in list(st.budgets) if names is None else list(names):
        b, row = st.budgets.get(name), by_name.pop(name, None)
        if b is None:
            if row is not None:
                out.append(f"budget {name!r} is in the budgets table but was never created in the log (row inserted)")
        elif row is None:
            out.append(f"budget {name!r} is in the log but not in the budgets table (row deleted)")
        else:
            _, cap, reserved, outstanding, wjson = row
            if (cap, reserved, outstanding) != (b.cap, b.reserved, b.outstanding):
                out.append(
                    f"budget {name!r} row says cap={cap} reserved={reserved} outstanding={outstanding}, "
                    f"the log says cap={b.cap} reserved={b.reserved} outstanding={b.outstanding} (row changed)"
                )
            if sorted(tuple(w) for w in json.loads(wjson)) != sorted(b.windows):
                out.append(f"budget {name!r} row's windows differ from the log's (row changed)")
    if names is None:
        out += [f"budget {name!r} is in the budgets table but was never created in the log (row inserted)" for name in by_name]
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
    out += [f"reservation {rid} is in the reservations table but not in the log (row inserted)" for rid in stored]
    return out
