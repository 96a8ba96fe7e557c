"""Cost of deriving the meter's state from the log: follow_log (full replay at start) on a SQLite
ledger of N events, and a reservation with and without the replayed state.

    .venv/bin/python bench/replay_cost.py 100000

Prints figures; asserts nothing.
"""
import sys, tempfile, time
from exfilguard.ledger import open_ledger
n = int(sys.argv[1])
with tempfile.TemporaryDirectory() as d:
    url = f"sqlite:///{d}/l.db"
    led = open_ledger(url)
    led.ensure_budget("b", 10**15)
    done = 1
    while done < n:
        k = min(1000, n - done)
        led.batch([("reserve", ("b", 100, "m", i)) for i in range(k)])
        done += k
    led.close()
    led = open_ledger(url)
    t = time.perf_counter(); led.follow_log(); dt = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(200):
        led.reserve("b", 100, "m", i)
    per = (time.perf_counter() - t) / 200
    led.close()
    led = open_ledger(url)
    t = time.perf_counter()
    for i in range(200):
        led.reserve("b", 100, "m", i)
    per0 = (time.perf_counter() - t) / 200
    print(f"{n} events: follow_log {dt:.2f} s ({dt / n * 1e6:.1f} us/event); reserve with replay {per * 1000:.2f} ms, without {per0 * 1000:.2f} ms (mean of 200, fsync included)")
