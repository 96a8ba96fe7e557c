"""What an answer may cost, and whether the budgets have room for it: admission before anything runs.

The meter parses nothing, so it can only cut a connection when the cap is spent, in the middle
of a frame: bytes that left and that nobody can read. The outside prevents that for honest
traffic by admitting an answer only with a byte allowance that both budgets (the caller's key
and the meter's global one) can pay in full:

    allowance = min(what max_tokens may cost, what the key has left, what the meter has left
                    for new answers)

and by lowering ``max_tokens`` to what the allowance pays for, so the answer ends with
``finish_reason: "length"`` instead of being cut. When even one token does not fit, the request
is refused before it reaches the inside (429 with the figures). The bound per token comes from
the codecs: a range coder gives every token at least one unit of 2^24 (<= 3 bytes), plus chunk
framing; see ``AnswerCost``.

The meter's figures are read from its ``GET /status``: ``remaining_bytes`` (grantable: cap minus
reserved, windows included) plus ``unforwarded_reserved_bytes`` (reserved by its open connections,
which here is the outside's, and not forwarded yet) is what it can still forward. Bytes received
since that snapshot and the allowances of answers in flight are taken off, so a snapshot up to
``max_age`` seconds old never lets two answers count the same bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from exfilguard.errors import BudgetExhausted

StatusFetch = Callable[[], Awaitable["dict[str, Any] | None"]]


@dataclass(frozen=True)
class AnswerCost:
    """An upper bound on what an honest answer costs through the meter, in bytes.

    per_token: the range coder's floor (one unit of 2^24: 3 bytes) plus a streamed answer's
    chunk framing (a frame and a chunk record every 16 tokens, < 1 byte per token).
    per_answer: the stream's header and end record (~13 bytes) and the frames around them.
    per_connection: the HELLO that opens a connection through the meter (bytes no answer carries).
    """

    per_token: int = 4
    per_answer: int = 32
    per_connection: int = 256

    def bound(self, max_tokens: int) -> int:
        """The most an answer of `max_tokens` tokens may cost."""
        return self.per_answer + self.per_token * max(0, max_tokens)

    def tokens_within(self, nbytes: int) -> int:
        """The most tokens an allowance of `nbytes` pays for (0 when not even one)."""
        return max(0, (nbytes - self.per_answer) // self.per_token)


@dataclass(frozen=True)
class MeterFigures:
    """The meter's budget as last read, named for what each figure counts (bytes)."""

    cap: int | None  # the cap of the budget
    forwarded: int  # bytes that left through the meter (settled and under open reservations)
    reserved: int  # bytes the ledger holds against the cap: forwarded + reserved not yet forwarded
    left: int  # bytes the meter can still forward (cap and windows), for answers in flight and new ones
    cap_left: int  # the same, the cap alone (windows free bytes with time; the cap does not)
    state: str

    @classmethod
    def from_status(cls, st: dict[str, Any]) -> MeterFigures | None:
        """Read a meter ``/status`` object; None when it lacks the figures."""
        rem, reserved = st.get("remaining_bytes"), st.get("reserved_bytes")
        if not isinstance(rem, int) or not isinstance(reserved, int):
            return None
        unfwd = st.get("unforwarded_reserved_bytes")
        unfwd = unfwd if isinstance(unfwd, int) and unfwd > 0 else 0
        cap_rem = st.get("cap_remaining_bytes")
        cap_rem = cap_rem if isinstance(cap_rem, int) else rem
        cap = st.get("cap_bytes") if isinstance(st.get("cap_bytes"), int) else None
        return cls(cap=cap, forwarded=max(0, reserved - unfwd), reserved=reserved, left=max(0, rem) + unfwd,
                   cap_left=max(0, cap_rem) + unfwd, state=str(st.get("state", "")))


class MeterView:
    """The meter's status, cached for `max_age` seconds, with the bytes received since it was read."""

    def __init__(self, fetch: StatusFetch | None, received: Callable[[], int], max_age: float = 0.5):
        self.fetch, self.received, self.max_age = fetch, received, max_age
        self.raw: dict[str, Any] | None = None
        self.figures: MeterFigures | None = None
        self._at = -1e9
        self._received_at = 0
        self._lock = asyncio.Lock()

    async def read(self, max_age: float | None = None) -> MeterFigures | None:
        """The figures, at most `max_age` (default: the view's) seconds old; None without a meter."""
        if self.fetch is None:
            return None
        age = self.max_age if max_age is None else max_age
        async with self._lock:
            if time.monotonic() - self._at > age:
                rcv = self.received()
                try:
                    st = await self.fetch()
                except Exception:  # noqa: BLE001 - meter down: no figure, and admission says so
                    st = None
                self.raw = st if isinstance(st, dict) else None
                self.figures = MeterFigures.from_status(self.raw) if self.raw else None
                self._at, self._received_at = time.monotonic(), rcv
        return self.figures

    def received_since(self) -> int:
        """Bytes the outside received since the figures were read (the meter forwarded them after)."""
        return max(0, self.received() - self._received_at)


class Admission:
    """Allowances of the answers in flight against the meter's global budget."""

    def __init__(self, view: MeterView, cost: AnswerCost, connected: Callable[[], bool], fresh_below: int = 1 << 20):
        self.view, self.cost, self.connected = view, cost, connected
        self.fresh_below = fresh_below  # below this many bytes left, read the meter at every admission
        self.in_flight: dict[int, int] = {}  # answer id -> allowance not yet received
        self._next = 0
        self._lock = asyncio.Lock()

    async def left_for_new(self) -> tuple[int | None, MeterFigures | None]:
        """Bytes the meter can forward for a new answer now (None: no meter figures to go by)."""
        f = await self.view.read()
        if f is not None and f.left - self._held() < self.fresh_below:
            f = await self.view.read(0.0)
        if f is None:
            return None, None
        hello = 0 if self.connected() else self.cost.per_connection
        return max(0, f.left - self.view.received_since() - self._held() - hello), f

    def _held(self) -> int:
        return sum(self.in_flight.values())

    async def admit(self, want: int) -> tuple[int, int | None, MeterFigures | None]:
        """Hold up to `want` bytes for one answer; (answer id, bytes held or None without a meter, figures).

        Raises BudgetExhausted, with the figures, when not even one token's worth is left."""
        async with self._lock:
            left, f = await self.left_for_new()
            aid, self._next = self._next, self._next + 1
            if left is None:
                return aid, None, None
            if left < self.cost.bound(1):
                raise budget_refusal(left, f, self._held(), self.cost)
            grant = min(want, left)
            self.in_flight[aid] = grant
            return aid, grant, f

    def shrink(self, aid: int, to: int) -> None:
        """Lower an answer's allowance (its key granted less)."""
        if aid in self.in_flight:
            self.in_flight[aid] = min(self.in_flight[aid], to)

    def received(self, aid: int, nbytes: int) -> None:
        """An answer's frame arrived: it no longer holds those bytes (they are in the bytes received)."""
        if aid in self.in_flight:
            self.in_flight[aid] = max(0, self.in_flight[aid] - nbytes)

    def done(self, aid: int) -> None:
        self.in_flight.pop(aid, None)


def budget_refusal(left: int, f: MeterFigures | None, held: int, cost: AnswerCost) -> BudgetExhausted:
    """The 429 for an answer the meter's budget cannot pay for, with the figures."""
    figs = ""
    if f is not None:
        figs = (f" (cap {f.cap} B, forwarded {f.forwarded} B, held by answers in flight {held} B)"
                if f.cap is not None else f" (held by answers in flight {held} B)")
    exc = BudgetExhausted(
        f"the egress budget has {left} bytes left for new answers{figs}; an answer of one token may cost up to "
        f"{cost.bound(1)} bytes ({cost.per_answer} framing + {cost.per_token} per token), so nothing was sent to the "
        "inside (ask the operators to raise the cap)")
    exc.left_bytes = left  # type: ignore[attr-defined]
    exc.cap_spent = f is None or f.cap_left - held < cost.bound(1)  # type: ignore[attr-defined]
    return exc
