"""Dashboard soak: ordinary traffic for N seconds with the meter signing a head every 30 s; count the
polls whose ledger verification is red (false alarms), then roll the ledger back to an earlier signed
head and count the polls until the page says so.

    nice .venv/bin/python bench/dashboard_soak.py [--seconds 600] [--poll 3] [--verify-every 30]

Real pieces: the tiny-random inside and the outside in this process, the real `exfilguard meter`
process with a SQLite ledger and a signing key (default --sth-interval 30 s), the dashboard's
Collector polling every --poll seconds as the page does. One chat request every ~2 s. Prints figures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

RED = {"failed", "rolled back", "error", "unavailable"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--poll", type=float, default=3.0)
    ap.add_argument("--verify-every", type=float, default=30.0)
    a = ap.parse_args()

    import openai

    from exfilguard.dashboard import Collector, DashboardConfig
    from exfilguard.inside.serve import make_backend, start_inside
    from exfilguard.ledger import reads
    from exfilguard.ledger.keytools import generate_keypair
    from exfilguard.models import load_model
    from exfilguard.outside.app import OutsideConfig
    from exfilguard.outside.client import http_status_probe
    from exfilguard.outside.serve import start_outside
    from exfilguard.protocol.codec_adapter import RealCodecFactory
    from exfilguard.supervise.assemble import LoopThread, MeterProcess

    tmp = Path(tempfile.mkdtemp(prefix="dash-soak-"))
    key, pub = generate_keypair(tmp / "meter.key")
    db = tmp / "ledger.sqlite"
    url = f"sqlite:///{db}"
    model = load_model("tiny-random")
    codecs = RealCodecFactory(model)
    lt = LoopThread()
    inside = lt.run(start_inside(make_backend(model), codecs, model.tokenizer, model.info.vocab_size))
    meter = MeterProcess(inside.port, url, 10**9, signing_key=key)
    meter.start()
    cfg = OutsideConfig(model_name="tiny-random", meter_status_url=meter.status_url, access_log=False)
    outside, port = lt.run(start_outside(codecs, model.tokenizer, model.info.fingerprint, ["k"], "127.0.0.1", meter.port,
                                         http_status_probe(meter.status_url), config=cfg))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=60)
    col = Collector(DashboardConfig(ledger_url=url, public_keys=[pub], refresh_seconds=a.poll, verify_every=a.verify_every))
    states: collections.Counter[str] = collections.Counter()
    red_polls: list[dict] = []
    rng = random.Random(1)
    t0 = time.monotonic()
    next_req = t0
    polls = requests = 0
    saved = None
    try:
        while time.monotonic() - t0 < a.seconds:
            now = time.monotonic()
            if now >= next_req:
                client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": f"hi {requests}"}],
                                               max_tokens=rng.choice([4, 16, 32]), temperature=0.7)
                requests += 1
                next_req = now + rng.uniform(1, 3)
            snap = col.poll()
            polls += 1
            v = snap["verify"]
            states[v["state"]] += 1
            if v["state"] in RED:
                red_polls.append({"t": round(now - t0, 1), "state": v["state"], "problems": v.get("problems", [])[:2]})
            if saved is None and snap.get("tree_head"):
                saved = tmp / "at-first-head.sqlite"  # a consistent copy of the ledger at its first signed head
                src = sqlite3.connect(db)
                dst = sqlite3.connect(saved)
                src.backup(dst)
                src.close()
                dst.close()
            time.sleep(a.poll)
        heads = len(reads.tree_heads(col._ledger))
        # Roll back to the saved head while the meter is stopped (as an attacker who owns the host would).
        meter.stop()  # it signs a last head as it stops
        col.poll()  # the page sees it, as it sees every head of a running meter
        polls_to_alarm = None
        if saved is not None:
            live = sqlite3.connect(db)
            sqlite3.connect(saved).backup(live)
            live.close()
            for i in range(1, 6):
                if col.poll()["verify"]["state"] == "rolled back":
                    polls_to_alarm = i
                    break
        print(json.dumps({
            "seconds": round(time.monotonic() - t0, 1), "requests": requests, "polls": polls, "signed_heads": heads,
            "states": dict(states), "false_alarms": len(red_polls), "red_polls": red_polls[:5],
            "rollback_to_first_head_alarm_after_polls": polls_to_alarm,
        }, indent=1))
    finally:
        col.close()
        lt.run(outside.stop())
        meter.stop()
        lt.run(inside.stop())
        lt.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
