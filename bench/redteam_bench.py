"""Every redteam scenario against the real stack, models loaded once; one JSON line each and a table.

    PYTHONPATH=src python bench/redteam_bench.py --strong smollm2 --weak default --cap 2000 --answers 40

The secret is random bytes (incompressible, like weights); each scenario gets a fresh ledger.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from exfilguard.redteam import SCENARIOS, RedteamConfig, run_redteam


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strong", default="smollm2")
    ap.add_argument("--weak", default="default")
    ap.add_argument("--cap", type=int, default=2000)
    ap.add_argument("--secret-bytes", type=int, default=16384)
    ap.add_argument("--answers", type=int, default=40, help="attack answers at most per protocol scenario")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = ap.parse_args()
    from exfilguard.models import load_model

    strong = load_model(args.strong)
    weak = strong if args.weak == args.strong else load_model(args.weak)
    secret = os.urandom(args.secret_bytes)
    rows = []
    for sc in args.scenarios.split(","):
        t0 = time.time()
        res = run_redteam(RedteamConfig(scenario=sc, secret=secret, cap=args.cap, strong=args.strong, weak=args.weak,
                                        warmup=args.warmup, answers=args.answers, max_tokens=args.max_tokens),
                          strong=strong, weak=weak, progress=lambda s: print(f"  {s}", file=sys.stderr))
        d = res.as_dict()
        d.pop("alerts")
        d["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(d), flush=True)
        rows.append(d)
    print("\n| scenario | cap | meter bytes | secret bytes recovered | cut off at | attack answers | flagged by | secret bytes before flag |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for d in rows:
        print(f"| {d['scenario']} | {d['cap_bytes']} | {d['meter_bytes']} | {d['secret_bytes_recovered']} | "
              f"{d['meter_bytes_at_cut'] if d['cut_off'] else 'not cut'} | {d['attack_answers']} | "
              f"{', '.join(d['flagged_by']) or 'nothing'} | {'-' if d['bytes_before_flag'] is None else d['bytes_before_flag']} |")


if __name__ == "__main__":
    main()
