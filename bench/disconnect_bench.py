"""A client that hangs up: how long until the inside stops generating its answer, streamed and not.

    nice .venv/bin/python bench/disconnect_bench.py [--runs 5]

tiny-random inside and the outside in this process, the real `exfilguard meter` process between
them. Each run sends a 4000-token request over a raw socket, waits until the inside is generating,
closes the socket and times how long the inside's engine keeps the row (and how many steps it ran
meanwhile). Prints figures (median and max); asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()

    from exfilguard.inside.serve import make_backend, start_inside
    from exfilguard.models import load_model
    from exfilguard.outside.app import OutsideConfig
    from exfilguard.outside.client import http_status_probe
    from exfilguard.outside.serve import start_outside
    from exfilguard.protocol.codec_adapter import RealCodecFactory
    from exfilguard.supervise.assemble import LoopThread, MeterProcess

    tmp = Path(tempfile.mkdtemp(prefix="disconnect-"))
    model = load_model("tiny-random")
    codecs = RealCodecFactory(model)
    lt = LoopThread()
    inside = lt.run(start_inside(make_backend(model), codecs, model.tokenizer, model.info.vocab_size))
    engine = inside.backend
    meter = MeterProcess(inside.port, f"sqlite:///{tmp / 'ledger.sqlite'}", 10**9)
    meter.start()
    cfg = OutsideConfig(model_name="tiny-random", meter_status_url=meter.status_url, access_log=False)
    outside, port = lt.run(start_outside(codecs, model.tokenizer, model.info.fingerprint, ["k"], "127.0.0.1", meter.port,
                                         http_status_probe(meter.status_url), config=cfg))
    out: dict[str, list[tuple[float, int]]] = {"stream": [], "non-stream": []}
    try:
        for run in range(a.runs):
            for mode in out:
                body = json.dumps({"prompt": f"x{run}", "max_tokens": 4000, "seed": run, "temperature": 1.0,
                                   "stream": mode == "stream"}).encode()
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          + f"Authorization: Bearer k\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
                deadline = time.monotonic() + 60
                while not engine._rows and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(0.5)  # well into the answer
                steps, t = engine.steps, time.monotonic()
                s.close()
                while engine._rows and time.monotonic() < deadline:
                    time.sleep(0.002)
                out[mode].append((time.monotonic() - t, engine.steps - steps))
                time.sleep(0.3)
    finally:
        lt.run(outside.stop())
        meter.stop()
        lt.run(inside.stop())
        lt.close()
    res = {}
    for mode, xs in out.items():
        secs = [x[0] for x in xs]
        res[mode] = {"runs": len(xs), "median_s": round(statistics.median(secs), 3), "max_s": round(max(secs), 3),
                     "median_steps": statistics.median(x[1] for x in xs), "max_steps": max(x[1] for x in xs)}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
