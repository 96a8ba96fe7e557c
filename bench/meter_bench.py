"""Meter benchmark: what the meter costs and how exact its count is, with SQLite and PostgreSQL.

    .venv/bin/python bench/meter_bench.py [--seconds 3] [--pg-url URL] [--only bulk,small,race,rest]

Sections (all by default):
- bulk: throughput of 1 and 50 connections reading flat out, through the meter vs direct
  loopback measured right before it (counted after --warmup seconds, so the blocks have grown;
  the whole-run ratio, ramp included, is reported too), and the meter's CPU per GB;
- small: 1 KB answers over 50 persistent connections: messages/s in a closed loop, and the
  latency at a paced --rate (messages/s over all connections) through the meter vs direct,
  the two paths taking turns every --slot seconds, measured from each message's scheduled
  time after --warmup seconds (new connections start with 4 KiB blocks that grow meanwhile);
- race: two meters on one PostgreSQL budget, 50 clients each pulling until the cap: bytes over;
- rest: a few small answers on persistent connections, then idle: ledger used - bytes forwarded
  per open connection.

Without --pg-url a throwaway PostgreSQL cluster is started (tests/pgserver.py). Meters run as
real `exfilguard meter` subprocesses with their default (adaptive) blocks unless --block, the
upstream as another process; this process runs the clients. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

UPSTREAM = r"""
import asyncio, sys
CHUNK = b"\xab" * 65536
SMALL = b"s" * int(sys.argv[3])
async def flood(r, w):
    try:
        while True:
            w.write(CHUNK); await w.drain()
    except Exception: pass
async def ping(r, w):
    try:
        while await r.read(1):
            w.write(SMALL); await w.drain()
    except Exception: pass
async def main():
    a = await asyncio.start_server(flood, "127.0.0.1", int(sys.argv[1]), backlog=512)
    b = await asyncio.start_server(ping, "127.0.0.1", int(sys.argv[2]), backlog=512)
    print("ready", flush=True)
    await asyncio.Event().wait()
try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""


def run(coro):
    """Run the clients on uvloop when it is installed (a faster client measures the meter, not itself)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def throughput(port: int, conns: int, seconds: float, warmup: float) -> tuple[float, float]:
    """(bytes/s received by `conns` clients reading flat out, counted after `warmup` s; bytes/s over the whole run)."""
    total = counted = 0
    t0 = time.perf_counter()
    start, stop = t0 + warmup, t0 + warmup + seconds

    async def one() -> None:
        nonlocal total, counted
        r, w = await asyncio.open_connection("127.0.0.1", port)
        while (now := time.perf_counter()) < stop:
            b = await r.read(1 << 20)
            if not b:
                break
            total += len(b)
            if now >= start:
                counted += len(b)
        w.close()

    await asyncio.gather(*[one() for _ in range(conns)])
    return counted / seconds, total / (time.perf_counter() - t0)


async def closed_loop(port: int, conns: int, seconds: float, size: int) -> float:
    """Messages/s: each connection sends a 1-byte request and waits for its `size`-byte answer, flat out."""
    n = 0
    stop = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal n
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"?")
        await r.readexactly(size)  # the first answer waits for the connection's first block
        while time.perf_counter() < stop:
            w.write(b"?")
            await r.readexactly(size)
            n += 1
        w.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[one() for _ in range(conns)])
    return n / (time.perf_counter() - t0)


async def interleaved(ports: dict[str, int], conns: int, rate: float, slot: float, slots: int, size: int,
                      warmup: float) -> dict[str, list[list[float]]]:
    """Latency (s) of answers requested at `rate` msgs/s over `conns` persistent connections per
    path, the paths taking turns in `slot`-second slots (direct, meter, direct, ...), measured from
    each answer's scheduled send time; per path, one list per slot after `warmup` seconds.

    Taking turns every fraction of a second puts both paths under the same conditions: on a
    shared VM the CPU steal changes by the second and moves a 99th percentile more than the
    meter does."""
    opened = {name: [await asyncio.open_connection("127.0.0.1", port) for _ in range(conns)] for name, port in ports.items()}
    for pairs in opened.values():  # each connection's first answer (the meter's first block)
        for r, w in pairs:
            w.write(b"?")
        for r, w in pairs:
            await r.readexactly(size)
    out: dict[str, list[list[float]]] = {name: [] for name in ports}
    period = conns / rate
    rng = random.Random(1)
    names = list(ports)
    t_start = time.perf_counter()
    for k in range(slots):
        name = names[k % len(names)]
        lat: list[float] = []
        t0 = time.perf_counter() + 0.005

        async def one(r, w, phase: float) -> None:
            i = 0
            while (due := t0 + phase + i * period) < t0 + slot:
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                w.write(b"?")
                await r.readexactly(size)
                lat.append(time.perf_counter() - due)
                i += 1

        await asyncio.gather(*[one(r, w, rng.uniform(0, period)) for r, w in opened[name]])
        if t0 - t_start >= warmup:
            out[name].append(lat)
    for pairs in opened.values():
        for _, w in pairs:
            w.close()
    return out


def steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests so far (all CPUs, /proc/stat), in seconds."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def start_meter(ledger: str, upstream_port: int, tmp: Path, cap: int = 10**15, extra: tuple[str, ...] = (),
                budget: str = "default") -> tuple[subprocess.Popen, int, int]:
    port, mport = free_port(), free_port()
    log = open(tmp / f"meter-{port}.log", "w")
    p = subprocess.Popen(
        [sys.executable, "-m", "exfilguard.cli.main", "meter", "--listen", f"127.0.0.1:{port}",
         "--upstream", f"127.0.0.1:{upstream_port}", "--ledger", ledger, "--cap", str(cap),
         "--metrics", f"127.0.0.1:{mport}", "--log-level", "WARNING", "--budget", budget, *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/status", timeout=1) as r:
                if json.loads(r.read())["state"] in ("ok", "exhausted"):
                    return p, port, mport
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"meter did not start; see {log.name}")


def stop_meter(p: subprocess.Popen) -> None:
    p.terminate()
    p.wait(60)


def metric(mport: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith((name + " ", name + "{")):
                return float(line.split()[-1])
    return 0.0


def meter_status(mport: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/status", timeout=5) as r:
        return json.loads(r.read())


def ledger_status(url: str, budget: str = "default"):
    from exfilguard.ledger import open_ledger, reads

    led = open_ledger(url, create=False)
    try:
        return reads.status(led, budget)
    finally:
        led.close()


def bench_bulk(args, ledgers, fport, tmp, block_args) -> list[dict]:
    rows = []
    direct: dict[int, tuple[float, float]] = {}
    for name, url in ledgers:
        for c in (1, 50):
            # Direct right before each meter run: the load of a shared machine changes by the minute.
            direct[c] = run(throughput(fport, c, args.seconds, args.warmup))
            meter, port, mport = start_meter(url, fport, tmp, extra=block_args, budget=f"bulk{c}")
            try:
                n0, s0 = metric(mport, "exfilguard_meter_ledger_commit_seconds_count"), metric(mport, "exfilguard_meter_ledger_commit_seconds_sum")
                cpu0, b0 = cpu_seconds(meter.pid), meter_status(mport)["bytes_out"]
                thr, whole = run(throughput(port, c, args.seconds, args.warmup))
                cpu1, b1 = cpu_seconds(meter.pid), meter_status(mport)["bytes_out"]
                wait = metric(mport, "exfilguard_meter_block_wait_seconds_total")
                n1, s1 = metric(mport, "exfilguard_meter_ledger_commit_seconds_count"), metric(mport, "exfilguard_meter_ledger_commit_seconds_sum")
            finally:
                stop_meter(meter)
            rows.append({
                "ledger": name, "conns": c, "direct_MBps": direct[c][0] / 1e6, "meter_MBps": thr / 1e6,
                "ratio": thr / direct[c][0], "whole_run_ratio": whole / direct[c][1],
                "commits": int(n1 - n0), "commit_mean_ms": (s1 - s0) / max(1, n1 - n0) * 1e3,
                "meter_cpu_s_per_GB": (cpu1 - cpu0) / max(1, b1 - b0) * 1e9,
                "block_wait_s_per_conn": wait / c, "run_s": args.warmup + args.seconds,
            })
            print(f"bulk {name} {c} conns: {rows[-1]['meter_MBps']:.1f} MB/s, {rows[-1]['ratio']:.2f} x direct, "
                  f"meter CPU {rows[-1]['meter_cpu_s_per_GB']:.2f} s/GB, waited for blocks "
                  f"{rows[-1]['block_wait_s_per_conn']:.2f} s per connection", flush=True)
    return rows


def bench_small(args, ledgers, pport, tmp, block_args) -> list[dict]:
    rows = []
    conns = 50
    for name, url in ledgers:
        d_rate = run(closed_loop(pport, conns, args.seconds, args.chunk))
        meter, port, mport = start_meter(url, pport, tmp, extra=block_args, budget="small")
        try:
            cpu0, b0 = cpu_seconds(meter.pid), meter_status(mport)["bytes_out"]
            rate = run(closed_loop(port, conns, args.seconds, args.chunk))
            cpu1, b1 = cpu_seconds(meter.pid), meter_status(mport)["bytes_out"]
            w0, st0, t0 = metric(mport, "exfilguard_meter_block_wait_seconds_total"), steal_seconds(), time.perf_counter()
            # Whole pairs of slots: --seconds x --rounds measured in all (half per path), plus the warm-up.
            slots = 2 * max(1, round(args.seconds * args.rounds / (2 * args.slot)))
            warm = 2 * math.ceil(args.warmup / (2 * args.slot))
            lat = run(interleaved({"direct": pport, "meter": port}, conns, args.rate, args.slot, slots + warm, args.chunk, args.warmup))
            w1, steal = metric(mport, "exfilguard_meter_block_wait_seconds_total"), (steal_seconds() - st0) / (time.perf_counter() - t0)
        finally:
            stop_meter(meter)
        d_all = [x for sl in lat["direct"] for x in sl]
        m_all = [x for sl in lat["meter"] for x in sl]
        # Per pair of neighbouring slots (same conditions): meter p99 - direct p99.
        pair_added = sorted((pct(m, 99) - pct(d, 99)) * 1e3 for d, m in zip(lat["direct"], lat["meter"]) if d and m)
        rows.append({
            "ledger": name, "conns": conns, "size": args.chunk, "direct_msgs_s": d_rate, "meter_msgs_s": rate,
            "paced_rate": args.rate, "slot_s": args.slot, "slots_per_path": len(lat["meter"]), "answers_per_path": len(m_all),
            "direct_p50_ms": pct(d_all, 50) * 1e3, "direct_p99_ms": pct(d_all, 99) * 1e3,
            "meter_p50_ms": pct(m_all, 50) * 1e3, "meter_p99_ms": pct(m_all, 99) * 1e3,
            "added_p50_ms": (pct(m_all, 50) - pct(d_all, 50)) * 1e3, "added_p99_ms": (pct(m_all, 99) - pct(d_all, 99)) * 1e3,
            "added_p99_ms_slot_pairs_median": statistics.median(pair_added),
            "meter_cpu_us_per_msg": (cpu1 - cpu0) / max(1, (b1 - b0) / args.chunk) * 1e6,
            "paced_block_wait_s": w1 - w0, "cpu_steal_share": steal / (os.cpu_count() or 1),
        })
        r = rows[-1]
        print(f"small {name}: {rate:.0f} msgs/s (direct {d_rate:.0f}), meter CPU {r['meter_cpu_us_per_msg']:.0f} us/msg; "
              f"paced {args.rate:g}/s, paths taking turns every {args.slot:g} s ({r['answers_per_path']} answers each): "
              f"p50 / p99 meter {r['meter_p50_ms']:.2f} / {r['meter_p99_ms']:.2f} ms, direct {r['direct_p50_ms']:.2f} / "
              f"{r['direct_p99_ms']:.2f} ms, added p99 {r['added_p99_ms']:.2f} ms (median over slot pairs "
              f"{r['added_p99_ms_slot_pairs_median']:.2f}); waited for blocks {w1 - w0:.2f} s; CPU steal "
              f"{100 * r['cpu_steal_share']:.0f}%", flush=True)
    return rows


def bench_race(args, pg_url, fport, tmp, block_args) -> dict:
    cap = args.race_cap
    budget = f"race{time.time_ns()}"
    meters = [start_meter(pg_url, fport, tmp, cap=cap, extra=block_args, budget=budget) for _ in range(2)]

    async def pull(port: int) -> int:
        n = 0
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            while b := await r.read(1 << 20):
                n += len(b)
        except (ConnectionError, OSError):
            pass
        w.close()
        return n

    async def main() -> list[int]:
        return list(await asyncio.gather(*[pull(m[1]) for m in meters for _ in range(50)]))

    t0 = time.perf_counter()
    try:
        got = run(main())
    finally:
        for p, _, _ in meters:
            stop_meter(p)
    dt = time.perf_counter() - t0
    st = ledger_status(pg_url, budget)
    row = {"cap": cap, "received": sum(got), "over_cap": max(0, sum(got) - cap), "ledger_reserved": st.reserved_bytes,
           "ledger_outstanding": st.outstanding_bytes, "seconds": dt, "clients": len(got)}
    print(f"race: 2 meters x 50 clients, cap {cap}: received {sum(got)}, over the cap {row['over_cap']}, "
          f"ledger {st.reserved_bytes} ({dt:.1f}s)", flush=True)
    return row


def bench_rest(args, ledgers, pport, tmp, block_args) -> list[dict]:
    rows = []
    for name, url in ledgers:
        meter, port, mport = start_meter(url, pport, tmp, cap=10**12, extra=block_args, budget="rest")
        try:
            before = ledger_status(url, "rest")

            async def main() -> tuple[int, list]:
                conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(args.rest_conns)]
                n = 0
                for _ in range(args.rest_answers):
                    for r, w in conns:
                        w.write(b"?")
                        n += len(await r.readexactly(args.rest_size))
                return n, conns

            loop = asyncio.new_event_loop()
            received, conns = loop.run_until_complete(main())
            time.sleep(args.settle_wait)  # the connections stay open, idle
            st = ledger_status(url, "rest")
            mst = meter_status(mport)
            for _, w in conns:
                w.close()
            loop.close()
        finally:
            stop_meter(meter)
        used = st.used_bytes - before.used_bytes
        rows.append({
            "ledger": name, "open_conns": args.rest_conns, "received": received, "ledger_used": used,
            "ledger_forwarded": st.forwarded_bytes - before.forwarded_bytes,
            "ledger_outstanding": st.outstanding_bytes - before.outstanding_bytes,
            "used_minus_forwarded_per_conn": (used - received) / args.rest_conns, "meter_bytes_out": mst["bytes_out"],
        })
        print(f"rest {name}: {received} B received on {args.rest_conns} open connections; ledger used {used}, "
              f"forwarded {rows[-1]['ledger_forwarded']}, outstanding {rows[-1]['ledger_outstanding']}: "
              f"{rows[-1]['used_minus_forwarded_per_conn']:.0f} B per open connection", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=1.0, help="bulk: seconds before counting (blocks grow meanwhile)")
    ap.add_argument("--only", default="bulk,small,race,rest", help="comma-separated sections")
    ap.add_argument("--ledgers", default="sqlite,postgresql")
    ap.add_argument("--block", default=None, help="--reserve-block for every meter (default: the meter's)")
    ap.add_argument("--min-block", default=None, help="--min-block for every meter (default: the meter's)")
    ap.add_argument("--chunk", type=int, default=1000, help="small: answer size in bytes")
    ap.add_argument("--rate", type=float, default=5000, help="small: paced messages/s over all 50 connections")
    ap.add_argument("--rounds", type=int, default=3, help="small: paced seconds measured = --seconds x --rounds, half per path")
    ap.add_argument("--slot", type=float, default=0.5, help="small: seconds per turn of each path (direct, meter, ...)")
    ap.add_argument("--race-cap", type=int, default=200_000_003)
    ap.add_argument("--rest-conns", type=int, default=3)
    ap.add_argument("--rest-answers", type=int, default=3)
    ap.add_argument("--rest-size", type=int, default=256)
    ap.add_argument("--settle-wait", type=float, default=2.0, help="rest: idle seconds before reading the ledger")
    ap.add_argument("--loop", default=None, help="--loop for every meter: auto, asyncio or uvloop (default: the meter's)")
    ap.add_argument("--pg-url", default=None)
    args = ap.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    block_args: tuple[str, ...] = ()
    if args.block:
        block_args += ("--reserve-block", args.block)
    if args.min_block:
        block_args += ("--min-block", args.min_block)
    if args.loop:
        block_args += ("--loop", args.loop)

    tmp = Path(tempfile.mkdtemp(prefix="meter-bench-"))
    fport, pport = free_port(), free_port()
    up = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(fport), str(pport), str(args.chunk)], stdout=subprocess.PIPE)
    assert up.stdout is not None and up.stdout.readline().strip() == b"ready"
    rest_up = None
    pg = None
    pg_url = args.pg_url
    wanted = [s.strip() for s in args.ledgers.split(",") if s.strip()]
    if pg_url is None and ("postgresql" in wanted or "race" in only):
        from pgserver import start_pg

        pg = start_pg()
        pg_url = pg.create_db("meter_bench")
    print(f"# exfilguard meter benchmark: {args.seconds:g}s per run, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"meter blocks: {' '.join(block_args) or 'defaults (adaptive)'}", flush=True)
    out: dict = {}

    def ledgers(tag: str) -> list[tuple[str, str]]:
        """(name, url) per wanted ledger: a fresh SQLite file or PostgreSQL database per section."""
        res = []
        for n in wanted:
            if n == "sqlite":
                res.append((n, f"sqlite:///{tmp}/{tag}.db"))
            elif n == "postgresql":
                res.append((n, pg.create_db(f"meter_{tag}") if pg is not None else pg_url))
            else:
                raise SystemExit(f"unknown ledger {n!r}: sqlite or postgresql")
        return res

    try:
        if "bulk" in only:
            out["bulk"] = bench_bulk(args, ledgers("bulk"), fport, tmp, block_args)
        if "small" in only:
            out["small"] = bench_small(args, ledgers("small"), pport, tmp, block_args)
        if "rest" in only:
            rest_up = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(free_port()), str(rport := free_port()), str(args.rest_size)],
                                       stdout=subprocess.PIPE)
            assert rest_up.stdout is not None and rest_up.stdout.readline().strip() == b"ready"
            out["rest"] = bench_rest(args, ledgers("rest"), rport, tmp, block_args)
        if "race" in only:
            race_url = pg.create_db("meter_race") if pg is not None else args.pg_url
            out["race"] = bench_race(args, race_url, fport, tmp, block_args)
    finally:
        up.terminate()
        if rest_up is not None:
            rest_up.terminate()
        if pg is not None:
            pg.destroy()
    print()
    if "bulk" in out:
        print("| ledger | conns | direct MB/s | meter MB/s | ratio | ratio incl. ramp | group commits | commit mean ms |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in out["bulk"]:
            print(f"| {r['ledger']} | {r['conns']} | {r['direct_MBps']:.0f} | {r['meter_MBps']:.0f} | {r['ratio']:.2f} | "
                  f"{r['whole_run_ratio']:.2f} | {r['commits']} | {r['commit_mean_ms']:.1f} |")
    if "small" in out:
        print(f"\n| ledger | {args.chunk} B answers, 50 conns: direct msgs/s | meter msgs/s | paced rate | "
              "direct p50 / p99 ms | meter p50 / p99 ms | added p99 ms | CPU steal |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in out["small"]:
            print(f"| {r['ledger']} | {r['direct_msgs_s']:.0f} | {r['meter_msgs_s']:.0f} | {r['paced_rate']:.0f} | "
                  f"{r['direct_p50_ms']:.2f} / {r['direct_p99_ms']:.2f} | {r['meter_p50_ms']:.2f} / {r['meter_p99_ms']:.2f} | "
                  f"{r['added_p99_ms']:.2f} | {100 * r['cpu_steal_share']:.0f}% |")
    if "rest" in out:
        print("\n| ledger | open conns | bytes received | ledger used | ledger forwarded | ledger outstanding | used - received per open conn |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in out["rest"]:
            print(f"| {r['ledger']} | {r['open_conns']} | {r['received']} | {r['ledger_used']} | {r['ledger_forwarded']} | "
                  f"{r['ledger_outstanding']} | {r['used_minus_forwarded_per_conn']:.0f} |")
    if "race" in out:
        r = out["race"]
        print(f"\nrace: 2 meters x 50 clients on one PostgreSQL budget, cap {r['cap']}: received {r['received']}, "
              f"over the cap {r['over_cap']}, ledger reserved {r['ledger_reserved']}, outstanding {r['ledger_outstanding']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
