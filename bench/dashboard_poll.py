"""Dashboard benchmark: how long the collector takes to read a ledger of N events, to follow new
ones, and to run verify_ledger, on a real SQLite ledger.

    .venv/bin/python bench/dashboard_poll.py [--events 20000] [--budgets 2]

Builds the ledger with reserve/release pairs (up to 500 per commit), then times the first poll (reads
the whole log; verify_ledger runs on its own thread), a poll after 1000 more events, a poll with
nothing new, and verify_ledger alone. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from exfilguard.dashboard import Collector, DashboardConfig
from exfilguard.ledger import open_ledger


def grow(url: str, budgets: list[str], events: int) -> None:
    led = open_ledger(url)
    try:
        for b in budgets:
            led.ensure_budget(b, 10**15)
        done = 0
        while done < events:
            ops = [("reserve", (budgets[i % len(budgets)], 4096, "bench", i)) for i in range(min(500, (events - done) // 2 or 1))]
            grants = led.batch(ops)
            led.batch([("release", (g.res, 1000, "bench")) for g in grants])
            done += 2 * len(grants)
    finally:
        led.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--budgets", type=int, default=2)
    a = ap.parse_args()
    names = [f"b{i}" for i in range(a.budgets)]
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'ledger.sqlite'}"
        t = time.perf_counter()
        grow(url, names, a.events)
        build = time.perf_counter() - t
        c = Collector(DashboardConfig(ledger_url=url, verify_every=1e9))
        try:
            t = time.perf_counter()
            first = c.poll()
            t_first = time.perf_counter() - t
            c.join_verify()
            grow(url, names, 1000)
            t = time.perf_counter()
            c.poll()
            t_incr = time.perf_counter() - t
            t = time.perf_counter()
            c.poll()
            t_idle = time.perf_counter() - t
        finally:
            c.close()
        led = open_ledger(url, create=False)
        from exfilguard.ledger.verify import verify_ledger

        t = time.perf_counter()
        rep = verify_ledger(led, [])
        t_verify = time.perf_counter() - t
        led.close()
    print(json.dumps({
        "events": first["budgets"][0]["tree_size"], "budgets": a.budgets, "build_s": round(build, 2),
        "first_poll_s": round(t_first, 3), "poll_after_1000_new_events_s": round(t_incr, 3),
        "poll_nothing_new_s": round(t_idle, 4), "verify_ledger_alone_s": round(t_verify, 3), "verify_ok": rep.ok,
        "used_points_per_budget": len(first["budgets"][0]["used_series"]),
    }))


if __name__ == "__main__":
    main()
