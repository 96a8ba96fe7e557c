"""Cost of one meter settle transaction on a followed ledger: µs per transaction and per op,
and statements sent per transaction, for single settle ops and batches of 50. On PostgreSQL
the writes after the head row's SELECT go in one pipeline: head SELECT, one sync, COMMIT.

    .venv/bin/python bench/ledger_roundtrips.py [--ops N]

Starts a throwaway PostgreSQL (tests/pgserver.py) when pg_ctl is installed. Prints figures;
asserts nothing.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

from exfilguard.ledger import Window, open_ledger

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # pgserver


class _Counting:
    """A cursor that counts execute/executemany calls (each is a round trip outside pipeline mode)."""

    def __init__(self, cur, box):
        self._cur, self._box = cur, box

    def execute(self, *a, **k):
        self._box[0] += 1
        self._cur.execute(*a, **k)
        return self

    def executemany(self, *a, **k):
        self._box[0] += 1
        return self._cur.executemany(*a, **k)

    @property
    def connection(self):
        conn, box = self._cur.connection, self._box

        class _Conn:
            def cursor(self):
                return _Counting(conn.cursor(), box)

            def __getattr__(self, name):
                return getattr(conn, name)

        return _Conn()

    def __getattr__(self, name):
        return getattr(self._cur, name)


def run(url: str, n: int, per_tx: int) -> str:
    led = open_ledger(url)
    led.ensure_budget("b", 10**15, [Window(3600, 10**14)])
    led.follow_log()
    box = [0]
    orig = led.db.begin_write
    led.db.begin_write = lambda: _Counting(orig(), box)  # type: ignore[method-assign]
    prev = [g.res for g in led.batch([("reserve", ("b", 4096, "m", i)) for i in range(per_tx)])]
    box[0] = 0
    txs = max(1, n // per_tx)
    t = time.perf_counter()
    for _ in range(txs):
        out = led.batch([("settle", ([(prev[i], 4000)], "b", 4096, "m", i)) for i in range(per_tx)])
        prev = [g.res for g in out]
    dt = time.perf_counter() - t
    led.close()
    return (f"{per_tx:3d} op/tx: {dt / txs * 1e6:8.0f} µs/tx {dt / (txs * per_tx) * 1e6:7.0f} µs/op "
            f"{box[0] / txs:6.1f} statements/tx (+ commit)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=2000, help="single-op transactions (and the base of the batch count)")
    n = ap.parse_args().ops
    with tempfile.TemporaryDirectory() as d:
        for k in (1, 50):
            print(f"sqlite      {run(f'sqlite:///{d}/l{k}.db', n if k == 1 else n * 5, k)}", flush=True)
    try:
        from pgserver import start_pg
    except ImportError:
        return
    pg = start_pg()
    try:
        for k in (1, 50):
            print(f"postgresql  {run(pg.create_db(f'rt{k}'), n if k == 1 else n * 5, k)}", flush=True)
    finally:
        pg.destroy()


if __name__ == "__main__":
    main()
