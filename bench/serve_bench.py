"""Whole-stack serving benchmark: prompts from the dev corpus through outside -> meter -> inside.

Prints, per (codec, flush) setting: meter-counted bytes per generated token, the UTF-8 text of
the same answers, the weak model's ideal (cross-entropy) bits, requests/s and tokens/s against
the strong model generating the same batch alone (same engine, no codec, no network), and time
to first token.

    .venv/bin/python bench/serve_bench.py --requests 16 --max-tokens 48 --settings model:0,model:16,coupled:0,coupled:4,coupled:16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "outside"))
CORPUS = ROOT / "data" / "smollm2_corpus_dev_sample.jsonl"  # the repo's 60-row sample of the dev corpus


def load_prompts(n: int, corpus: Path = CORPUS) -> list[list[int]]:
    seen, out = set(), []
    with open(corpus) as f:
        for line in f:
            r = json.loads(line)
            if r["prompt_id"] in seen:
                continue
            seen.add(r["prompt_id"])
            out.append([int(t) for t in r["prompt_ids"]])
            if len(out) >= n:
                break
    return out


class _Collect:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.ev = threading.Event()

    def tokens(self, ids):  # noqa: ANN001
        self.ids += list(ids)
        return False

    def done(self, reason):  # noqa: ANN001
        self.ev.set()


def strong_alone(strong, prompts, max_tokens, temperature, seeds):  # noqa: ANN001
    """The strong model generating the same batch alone: tokens and seconds."""
    from exfilguard.inside.engine import Job, LocalEngine
    from exfilguard.protocol.wire import GenerationRequest

    eng = LocalEngine(strong)
    eng.start()
    sinks = [_Collect() for _ in prompts]
    t = time.perf_counter()
    for p, s, seed in zip(prompts, sinks, seeds):
        eng.submit(Job(GenerationRequest(p, max_tokens, seed, temperature), s))
    for s in sinks:
        s.ev.wait()
    dt = time.perf_counter() - t
    eng.stop()
    return [s.ids for s in sinks], dt


def ideal_bits(weak, prompts, outs) -> float:  # noqa: ANN001
    """Sum over answers of -log2 q_weak(token): the model codec's ideal."""
    total = 0.0
    for p, toks in zip(prompts, outs):
        if not toks:
            continue
        logits = np.asarray(weak.score_fast(p, toks), dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(logits).sum(axis=1))
        lp = logits[np.arange(len(toks)), toks] - lse
        total += float(-lp.sum()) / math.log(2)
    return total


def run_setting(strong, weak, prompts, seeds, args, codec: str, flush: int, flush_ms: float = 0.0) -> dict:  # noqa: ANN001
    import openai
    from standin_meter import StandInMeter

    from exfilguard.outside.app import OutsideConfig
    from exfilguard.inside.serve import make_backend, start_inside
    from exfilguard.outside.serve import start_outside
    from exfilguard.supervise.assemble import LoopThread
    from exfilguard.protocol.codec_adapter import RealCodecFactory

    codecs = RealCodecFactory(weak)
    tok = strong.tokenizer
    lt = LoopThread()
    inside = lt.run(start_inside(make_backend(strong), codecs, tok, strong.info.vocab_size))
    meter = StandInMeter(inside.port, 10**12)
    mport = lt.run(meter.start())
    cfg = OutsideConfig(model_name="smollm2", codec=codec, flush_every=flush, flush_ms=flush_ms, default_max_tokens=args.max_tokens)
    outside, port = lt.run(start_outside(codecs, tok, codecs.weak_fingerprint, ["k"], "127.0.0.1", mport, meter.status, config=cfg))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=3600)
    client.models.list()
    client.completions.create(model="smollm2", prompt="warm up", max_tokens=2, temperature=0)  # connect; HELLO
    base = meter.used
    detok = tok

    def one(i: int) -> tuple[int, str, float]:
        t = time.perf_counter()
        ttft, text, n = None, [], 0
        stream = client.completions.create(model="smollm2", prompt=prompts[i], max_tokens=args.max_tokens, seed=seeds[i],
                                           temperature=args.temperature, stream=True, stream_options={"include_usage": True})
        for ch in stream:
            if ch.choices and ch.choices[0].text and ttft is None:
                ttft = time.perf_counter() - t
            if ch.choices:
                text.append(ch.choices[0].text)
            if ch.usage:
                n = ch.usage.completion_tokens
        return n, "".join(text), ttft if ttft is not None else time.perf_counter() - t

    t = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as ex:
        res = list(ex.map(one, range(len(prompts))))
    wall = time.perf_counter() - t
    lt.run(outside.stop())
    lt.run(meter.stop())
    lt.run(inside.stop())
    lt.close()
    toks = sum(r[0] for r in res)
    del detok
    return {
        "codec": codec, "flush": flush, "tokens": toks, "meter_bytes": meter.used - base,
        "text_bytes": sum(len(r[1].encode()) for r in res), "wall_s": wall,
        "ttft_p50_s": float(np.median([r[2] for r in res])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strong", default="smollm2")
    ap.add_argument("--weak", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--corpus", type=Path, default=CORPUS, help="dev corpus JSONL (default: the repo's 60-row sample)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--settings", default="model:0,model:16,coupled:0,coupled:4,coupled:16",
                    help="comma-separated CODEC:FLUSH_EVERY[:FLUSH_MS] (0 = one flush at the end; FLUSH_MS: also flush "
                         "when that many ms passed since the last flush)")
    args = ap.parse_args()

    from exfilguard.models.loading import load_models, resolve_weak_spec

    weak_spec = resolve_weak_spec(args.weak, args.strong)
    strong, weak = load_models(args.strong, weak_spec, args.device)
    prompts = load_prompts(args.requests, args.corpus)
    seeds = list(range(1000, 1000 + len(prompts)))
    outs, alone_s = strong_alone(strong, prompts, args.max_tokens, args.temperature, seeds)
    alone_toks = sum(len(o) for o in outs)
    ideal = ideal_bits(weak, prompts, outs)
    print(f"strong {args.strong}, weak {weak_spec}, device {args.device}, {len(prompts)} requests x <= {args.max_tokens} tokens, "
          f"T={args.temperature}, concurrency {args.concurrency}")
    print(f"strong alone: {alone_toks} tokens in {alone_s:.1f} s = {alone_toks / alone_s:.1f} tok/s, "
          f"{len(prompts) / alone_s:.2f} req/s; weak-model ideal (cross-entropy) {ideal / alone_toks:.2f} bits/token")
    print("| codec | flush every | meter bits/token | UTF-8 text bits/token | meter / ideal | tok/s | vs alone | req/s | TTFT p50 s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in args.settings.split(","):
        codec, _, rest = s.partition(":")
        flush, _, ms = rest.partition(":")
        r = run_setting(strong, weak, prompts, seeds, args, codec, int(flush or 0), float(ms or 0))
        n = max(r["tokens"], 1)
        tps = r["tokens"] / r["wall_s"]
        print(f"| {codec} | {(r['flush'] or 'end') if not ms else f'{flush} or {ms} ms'} | {8 * r['meter_bytes'] / n:.2f} | {8 * r['text_bytes'] / n:.1f} | "
              f"{8 * r['meter_bytes'] / max(ideal * n / alone_toks, 1e-9):.2f} | {tps:.1f} | {tps / (alone_toks / alone_s):.2f} | "
              f"{len(prompts) / r['wall_s']:.2f} | {r['ttft_p50_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
