"""Scenario timing at several delays: bits a colluder recovers from when frames arrive and when
connections close, against the bits the meter charged. One JSON line per (delay, channel) and a table.

    PYTHONPATH=src nice python bench/redteam_timing.py --bits 32 --delays 0.3,0.05,0.01

tiny-random models by default (the timing channel does not depend on the model); each run gets a
fresh meter and ledger.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from exfilguard.redteam.timing import TimingConfig, run_timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strong", default="tiny-random")
    ap.add_argument("--weak", default="tiny-random")
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--base", type=float, default=0.15, help="the gap that means 0, seconds")
    ap.add_argument("--delays", default="0.3,0.05,0.01", help="what a 1 adds, seconds (comma-separated)")
    ap.add_argument("--cap", type=int, default=100_000)
    ap.add_argument("--no-timing-charge", action="store_true", help="measure the meter without its timing charge")
    args = ap.parse_args()
    from exfilguard.models import load_model

    strong = load_model(args.strong)
    weak = strong if args.weak == args.strong else load_model(args.weak)
    secret = os.urandom(max(1, args.bits // 8 + 1))
    rows = []
    for delay in (float(x) for x in args.delays.split(",")):
        res = run_timing(TimingConfig(secret=secret, cap=args.cap, bits=args.bits, base=args.base, delay=delay,
                                      strong=args.strong, weak=args.weak, timing_charge=not args.no_timing_charge),
                         strong=strong, weak=weak,
                         progress=lambda s: print(f"  {s}", file=sys.stderr))
        for c in res.as_dict()["channels"]:
            c["delay_s"] = delay
            print(json.dumps(c), flush=True)
            rows.append(c)
    print("\n| channel | 1 = +delay | bits sent | decoded right | information (bits) | meter forwarded (B) | ledger charged (B) | charged beyond content (bits) | recovered <= charged | <= charged beyond content |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in rows:
        print(f"| {c['channel']} | {c['delay_s'] * 1000:g} ms | {c['bits_sent']} | {c['bits_correct']} | {c['recovered_bits']:g} | "
              f"{c['meter_bytes']} | {c['charged_bytes']} | {c['timing_charge_bits']} | {'yes' if c['target_met'] else 'no'} | "
              f"{'yes' if c['strict_target_met'] else 'no'} |")


if __name__ == "__main__":
    main()
