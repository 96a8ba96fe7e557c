"""Request-log reconciliation on honest traffic: false alarms over N answers, and a deleted answer caught.

    nice .venv/bin/python bench/reconcile_fp.py [--answers 600] [--every 50]

Real pieces: the tiny-random inside and the outside (request log keyed with its own Ed25519 key) in
this process, the real `exfilguard meter` process with a SQLite ledger. Answers mix streaming and
not, stop strings, max_tokens 4-64, T = 0 / 0.7 / 1. Every --every answers the log is reconciled
with the live ledger (answers in flight allowed for by the open reservations); at the end, after
the meter stops and settles, once more at rest; then one answer is deleted and the chain recomputed
and re-signed with the key itself, and reconciled again. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", type=int, default=600)
    ap.add_argument("--every", type=int, default=50)
    a = ap.parse_args()

    import openai

    from exfilguard.errors import LogUnreconciled
    from exfilguard.inside.serve import make_backend, start_inside
    from exfilguard.ledger.keys import load_private_key
    from exfilguard.models import load_model
    from exfilguard.outside.app import OutsideConfig
    from exfilguard.outside.audit import AuditConfig
    from exfilguard.outside.client import http_status_probe
    from exfilguard.outside.serve import start_outside
    from exfilguard.protocol.codec_adapter import RealCodecFactory
    from exfilguard.supervise.assemble import LoopThread, MeterProcess
    from exfilguard.verify.reconcile import reconcile
    from exfilguard.verify.requestlog import SIG_DOMAIN

    tmp = Path(tempfile.mkdtemp(prefix="reconcile-fp-"))
    log = tmp / "requests.jsonl"
    url = f"sqlite:///{tmp / 'ledger.sqlite'}"
    model = load_model("tiny-random")
    codecs = RealCodecFactory(model)
    lt = LoopThread()
    inside = lt.run(start_inside(make_backend(model), codecs, model.tokenizer, model.info.vocab_size))
    meter = MeterProcess(inside.port, url, 10**9)
    meter.start()
    cfg = OutsideConfig(model_name="tiny-random", meter_status_url=meter.status_url, access_log=False,
                        audit=AuditConfig(request_log=str(log)))
    outside, port = lt.run(start_outside(codecs, model.tokenizer, model.info.fingerprint, ["k"], "127.0.0.1", meter.port,
                                         http_status_probe(meter.status_url), config=cfg))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=60)
    pub = load_private_key(Path(str(log) + ".key")).public_key()
    rng = random.Random(3)
    live_checks = live_alarms = 0
    t0 = time.monotonic()
    try:
        for i in range(a.answers):
            kw = dict(model="tiny-random", prompt=f"item {i}", max_tokens=rng.choice([4, 16, 64]),
                      temperature=rng.choice([0.0, 0.7, 1.0]), seed=i)
            if rng.random() < 0.3:
                kw["stop"] = [rng.choice("aeiou")]
            if rng.random() < 0.5:
                list(client.completions.create(stream=True, **kw))
            else:
                client.completions.create(**kw)
            if (i + 1) % a.every == 0:
                live_checks += 1
                try:
                    reconcile(log, url, public_key=pub)
                except LogUnreconciled as exc:
                    live_alarms += 1
                    print("live alarm:", exc)
        serve_s = time.monotonic() - t0
    finally:
        lt.run(outside.stop())
        meter.stop()
        lt.run(inside.stop())
        lt.close()
    rest = reconcile(log, url, public_key=pub)
    # The attack: one answer out, the chain recomputed and signed again with the key itself.
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    victim = next(i for i, d in enumerate(lines) if d["type"] == "request" and d["wire_bytes"] > 0)
    key = load_private_key(Path(str(log) + ".key"))
    prev, out = "0" * 64, []
    for i, d in enumerate(lines[:victim] + lines[victim + 1:]):
        d = {k: v for k, v in d.items() if k not in ("seq", "prev", "sig")}
        line = json.dumps({"seq": i, "prev": prev, **d}, separators=(",", ":"), ensure_ascii=False).encode()
        line = line[:-1] + b',"sig":"' + key.sign(SIG_DOMAIN + line).hex().encode() + b'"}'
        out.append(line)
        prev = hashlib.sha256(line).hexdigest()
    edited = tmp / "edited.jsonl"
    edited.write_bytes(b"".join(x + b"\n" for x in out))
    try:
        reconcile(edited, url, public_key=pub)
        caught = False
    except LogUnreconciled:
        caught = True
    print(json.dumps({
        "answers": a.answers, "serve_seconds": round(serve_s, 1), "live_checks": live_checks, "live_false_alarms": live_alarms,
        "at_rest": rest.as_dict(), "deleted_answer_bytes": lines[victim]["wire_bytes"], "deleted_answer_caught": caught,
    }, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
