"""Charge each answer's metered bytes to the API key that asked for it.

The meter counts bytes on one shared connection and parses nothing; the outside receives
exactly the frames of each answer's slot, so it can attribute them. Before an answer starts,
the outside reserves a bound on its bytes in the key's budget (429 if nothing is left); as
frames arrive it tops the reservation up, and stops the answer when the key's budget cannot
cover the next frame; at the end it settles the reservations at the bytes actually received.
Frames already on the wire when a key runs dry still arrive and are recorded (``key_overrun``),
so the key's count is never lower than what it received.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from exfilguard.errors import ExfilguardError, KeyBudgetExhausted
from exfilguard.ledger.apikeys import ApiKey, KeyStore

log = logging.getLogger(__name__)


@dataclass
class KeyAccount:
    """One answer's bytes, reserved against and settled in its key's budget."""

    store: KeyStore
    key: ApiKey
    used: int = 0  # bytes of this answer's frames received so far
    granted: int = 0
    reservations: list[tuple[int, int]] = field(default_factory=list)  # (res, amount)
    settled: bool = False
    _late: int = 0

    async def open(self, want: int, minimum: int = 1) -> int:
        """Reserve up to `want` bytes and return how many were granted; KeyBudgetExhausted (429,
        with the figures) when fewer than `minimum` (what the smallest answer may cost) are left."""
        g = await asyncio.to_thread(self.store.reserve, self.key, max(1, want))
        if g.res is not None and 0 < g.granted < minimum:
            # Not enough for even one token: give it back, so nothing is spent for no text.
            await asyncio.to_thread(self.store.release, g.res, 0)
            raise await self._spent(g.reason, g.granted, minimum)
        if g.granted <= 0 or g.res is None:
            raise await self._spent(g.reason, 0, minimum)
        self.reservations.append((g.res, g.granted))
        self.granted += g.granted
        return g.granted

    async def _spent(self, reason: str, left: int, minimum: int) -> KeyBudgetExhausted:
        st = await asyncio.to_thread(self.store.status, self.key)
        window = reason.startswith("window") or (st.remaining_bytes >= minimum)
        retry = await asyncio.to_thread(self.store.retry_after, self.key) if window else None
        what = "a rolling window of its budget" if retry is not None else "its cap"
        cap = f"cap {st.cap_bytes} B, " if st.cap_bytes is not None else ""
        return KeyBudgetExhausted(
            f"API key {self.key.name!r} has spent {what}: {left} bytes left for new answers ({cap}forwarded "
            f"{st.forwarded_bytes} B, held by its answers in flight {st.outstanding_bytes} B) and an answer of one token may "
            f"cost up to {minimum} bytes; "
            + (f"retry in {retry} s" if retry is not None else "ask the operators for a key with a larger budget"),
            retry)

    async def _reserve(self, want: int) -> None:
        g = await asyncio.to_thread(self.store.reserve, self.key, want)
        if g.granted <= 0 or g.res is None:
            raise await self._spent(g.reason, 0, 1)
        self.reservations.append((g.res, g.granted))
        self.granted += g.granted

    def add(self, nbytes: int) -> None:
        """Count bytes of a frame of this answer (called as each frame arrives, drained ones too)."""
        if self.settled:
            self._late += nbytes
            asyncio.get_running_loop().create_task(self._charge_late())
            return
        self.used += nbytes

    async def cover(self, block: int) -> None:
        """Top the reservation up to what has arrived plus `block`; raise KeyBudgetExhausted if it cannot."""
        if self.used > self.granted:
            await self._reserve(self.used - self.granted + block)
            if self.used > self.granted:
                raise KeyBudgetExhausted(f"API key {self.key.name!r} has spent its budget during this answer")

    async def settle(self) -> None:
        """Settle every reservation at the bytes received; record any excess as an overrun."""
        if self.settled:
            return
        self.settled = True
        left = self.used
        try:
            for res, amount in self.reservations:
                take = min(left, amount)
                left -= take
                await asyncio.to_thread(self.store.release, res, take)
            if left > 0:
                await self._charge(left)
        except ExfilguardError as exc:
            log.error("cannot settle API key %s's bytes in the keys ledger: %s", self.key.name, exc)

    async def _charge(self, nbytes: int) -> None:
        """Charge bytes that arrived past the reservations: reserve what fits, record the rest."""
        g = await asyncio.to_thread(self.store.reserve, self.key, nbytes)
        if g.res is not None and g.granted > 0:
            await asyncio.to_thread(self.store.release, g.res, g.granted)
        if g.granted < nbytes:
            await asyncio.to_thread(self.store.overrun, self.key, nbytes - g.granted)

    async def _charge_late(self) -> None:
        n, self._late = self._late, 0
        if n:
            try:
                await self._charge(n)
            except ExfilguardError as exc:
                log.error("cannot charge API key %s's late bytes: %s", self.key.name, exc)
