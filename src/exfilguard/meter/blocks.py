"""How large a connection's next reservation block is: policy for throughput, not for the cap.

Whatever size is asked, the ledger grants at most what the cap and the windows allow, and a byte
is forwarded only out of a committed block; sizing decides how often a connection waits for a
commit and how much a crash can leave counted but unsent (two blocks per connection).
"""

from __future__ import annotations

# A connection asks for a block its drain rate uses in about this many seconds, at most GROW_MAX
# times the last block: long enough that the pipelined commit finishes before the block drains,
# and never much more than the connection has just shown it forwards.
GROW_TARGET = 0.25
GROW_MAX = 4
# ... or, when the ledger is slow, this many times the recent wait for a reservation, so that the
# next block (asked for as the current one starts) commits before the current one drains.
COMMIT_FACTOR = 4
# No block asks for more than 1/ROOM_FRACTION of what the budget has left (cap and windows, as last
# seen): a small answer under a small cap does not hold most of it, and a crash over-counts little.
ROOM_FRACTION = 16


def within_room(want: int, room: int) -> int:
    """`want`, but at most 1/ROOM_FRACTION of `room` (and at least one byte: the ledger decides the rest)."""
    return max(1, min(want, room // ROOM_FRACTION))


def next_size(used: int, seconds: float, block: int, amount: int, commit_wait: float, first: int, ceiling: int) -> int:
    """The block to ask for after one of `amount` bytes drained `used` bytes in `seconds`: what that
    rate uses in GROW_TARGET seconds (or COMMIT_FACTOR x the recent commit wait, if longer), at most
    GROW_MAX x the larger of it and the last size asked (`block`), within [first, ceiling]."""
    rate = used / max(seconds, 1e-4)
    horizon = max(GROW_TARGET, COMMIT_FACTOR * commit_wait)
    return max(first, min(int(rate * horizon), GROW_MAX * max(block, amount), ceiling))


def stalled_size(block: int, ceiling: int) -> int:
    """The next size after a block drained before the next one committed: too small for this ledger."""
    return min(ceiling, GROW_MAX * block)


# Timing is egress: when bytes arrive and when a connection opens and closes carry bits the inside
# controls. Each such event is counted in the ledger as at least 8 bytes, 64 bits, more than the time
# of one event can carry (nanoseconds over five centuries): an upstream read shorter than EVENT_MIN
# counts as EVENT_MIN, and a connection is charged OPEN_CHARGE + CLOSE_CHARGE from its first block,
# before its first byte. docs/meter.md states the bound.
EVENT_MIN = 8
OPEN_CHARGE = 8
CLOSE_CHARGE = 8
