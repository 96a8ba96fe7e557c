"""The release scheduler: an answer's text reaches the client only at the ticks of a clock that the
inside does not control (a fake clock: no timing assertions)."""

from __future__ import annotations

import asyncio

import pytest

from exfilguard.outside.app import ReleaseClock, on_clock


class FakeTime:
    """A clock that moves only when the test sleeps."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def run_on_clock(arrivals: list[tuple[float, str]], period: float = 1.0, fail_at: float | None = None):
    """Feed strings at the given (fake) times through on_clock; return [(release time, text)]."""
    ft = FakeTime()
    clock = ReleaseClock(period, start=ft.t, clock=ft)
    out: list[tuple[float, str]] = []

    async def main() -> None:
        real_sleep = asyncio.sleep

        async def source():
            for t, x in sorted(arrivals):
                while ft.t < 100.0 + t:  # the inside takes its time: wait for the fake clock to get there
                    await real_sleep(0)
                yield x
            if fail_at is not None:
                raise RuntimeError("inside failed")

        async def fake_sleep(d: float) -> None:
            ft.t += d  # time moves only here, when the scheduler sleeps until its next tick
            for _ in range(3):
                await real_sleep(0)  # let the source catch up with the new time

        asyncio.sleep = fake_sleep  # type: ignore[assignment]
        try:
            async for text in on_clock(source(), clock):
                out.append((round(ft.t - 100.0, 6), text))
        finally:
            asyncio.sleep = real_sleep  # type: ignore[assignment]

    asyncio.run(main())
    return out


def test_text_goes_out_only_at_ticks_joined():
    got = run_on_clock([(0.1, "a"), (0.2, "b"), (1.5, "c"), (1.7, "d"), (3.2, "e")])
    assert [t for t, _ in got] == [1.0, 2.0, 4.0]  # whole ticks from the request's start, never the arrival times
    assert [x for _, x in got] == ["ab", "cd", "e"]


def test_two_inside_timings_in_one_tick_look_the_same():
    """Frames 0.15 s apart or 0.45 s apart, within one tick: the client sees the same thing."""
    fast = run_on_clock([(0.1, "x"), (0.25, "y")])
    slow = run_on_clock([(0.1, "x"), (0.55, "y")])
    assert fast == slow == [(1.0, "xy")]


def test_an_error_is_raised_at_a_tick_after_the_text_before_it():
    with pytest.raises(RuntimeError):
        run_on_clock([(0.3, "a")], fail_at=0.3)
