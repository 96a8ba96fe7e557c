"""Whole-stack serving benchmark: prompts from the dev corpus through outside -> meter -> inside.

Prints, per (codec, flush) setting: meter-counted bytes per generated token, the UTF-8 text of
the same answers, the weak model's ideal (cross-entropy) bits, requests/s and tokens/s against
the strong model generating the same batch alone (same engine, no codec, no network), and time
to first token.

    .venv/bin/python bench/serve_bench.py --requests 16 --max-tokens 48 --settings model:0,model:16,coupled:0,coupled:4,coupled:16

Two more parts, each on its own (they skip the table above):

--decode-rate 1,8,32: the outside's decoding alone: the dev sample's answers are encoded once
(codec --codec, one flush per --flush-every tokens), then N threads decode them as the outside
does (one decoder per answer, each answer's bytes pushed as they would arrive, a thread taking
the next answer when one ends), their weak-model tables from shared passes. Prints tokens per
second per CPU core (decoded tokens / the process's CPU seconds) and per wall second. Imports
only what an old tree also has, so `PYTHONPATH=OLD/src python bench/serve_bench.py
--decode-rate ...` measures an older checkout with the same script.

--up stack,long,short4: `exfilguard up` as a user runs it (separate processes, the default weak
model), the openai client: `stack` sends the table's batch (--requests prompts, --max-tokens, T)
for each codec of --settings, whole answers then streamed ones (a flush every 16 tokens), against
the strong model alone in its own process, with the meter bits from up's access log; `long`
sends one prompt of --long-tokens tokens (dev answers glued together) with max_tokens=16 and
compares the time with the strong model's own (the inside's engine alone, in this process, same
request), and reads the outside process's peak RSS (VmHWM); `short4` times one short request (max_tokens=16) alone and then four at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
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


def alone_in_own_process(args: argparse.Namespace) -> dict:
    """The strong model alone on the batch, as a user runs it: its own process, OpenMP's default
    wait policy (spinning threads suit a process that only runs the model). {"tokens", "seconds"},
    the faster of two runs."""
    child = subprocess.run([sys.executable, __file__, "--alone-only", "--strong", args.strong, "--device", args.device,
                            "--corpus", str(args.corpus), "--requests", str(args.requests), "--max-tokens", str(args.max_tokens),
                            "--temperature", str(args.temperature)], capture_output=True, text=True, check=True,
                           env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"})
    return json.loads(child.stdout.strip().splitlines()[-1])


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
    backend = make_backend(strong)
    inside = lt.run(start_inside(backend, codecs, tok, strong.info.vocab_size))
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
    sec0, cpu0 = dict(backend.step_seconds), time.process_time()
    with ThreadPoolExecutor(args.concurrency) as ex:
        res = list(ex.map(one, range(len(prompts))))
    wall = time.perf_counter() - t
    cpu = time.process_time() - cpu0
    steps = {k: v - sec0[k] for k, v in backend.step_seconds.items()}
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
        "cpu_s": cpu, "step_seconds": steps,
    }


def decode_rate(args: argparse.Namespace) -> None:
    """The outside's decode rate at each stream count in args.decode_rate (see the docstring)."""
    import queue

    from exfilguard.models import load_model
    from exfilguard.protocol.codec_adapter import RealCodecFactory

    weak = load_model(args.weak or "default")
    rows = []
    with open(args.corpus) as f:
        for line in f:
            r = json.loads(line)
            if r["token_ids"]:
                rows.append(r)
    rows = rows[: args.requests]
    fac = RealCodecFactory(weak)
    codec = args.codec
    streams = []
    t0 = time.perf_counter()
    for r in rows:
        temp = float(r["temperature"])
        enc = fac.encoder(codec, r["prompt_ids"], int(r["seed"]), temp, 1.0)
        parts = []
        for i, t in enumerate(r["token_ids"]):
            enc.push(int(t))
            if args.flush_every and (i + 1) % args.flush_every == 0:
                parts.append(enc.flush())
        parts.append(enc.finish())
        streams.append((r, [p for p in parts if p]))
    print(f"weak {weak.info.spec}, codec {codec}, flush every {args.flush_every or 'end'}: {len(rows)} answers, "
          f"{sum(len(r['token_ids']) for r in rows)} tokens encoded in {time.perf_counter() - t0:.1f} s", flush=True)
    print("| streams | tokens | tokens/s per CPU core | tokens/s (wall) | CPU s | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in [int(x) for x in args.decode_rate.split(",") if x]:
        todo: queue.Queue[int] = queue.Queue()
        for i in range(len(streams)):
            todo.put(i)
        decoded = [0] * len(streams)
        bad: list[str] = []

        def worker() -> None:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                r, parts = streams[i]
                dec = fac.decoder(codec, r["prompt_ids"], int(r["seed"]), float(r["temperature"]), 1.0)
                got: list[int] = []
                for p in parts:
                    got += dec.push(p)
                got += dec.finish()
                decoded[i] = len(got)
                if got != [int(t) for t in r["token_ids"]]:
                    bad.append(str(i))

        c0, w0 = time.process_time(), time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        toks = sum(decoded)
        print(f"| {n} | {toks} | {toks / cpu:.0f} | {toks / wall:.0f} | {cpu:.1f} | {wall:.1f} |"
              + (f" WRONG TOKENS in answers {','.join(bad)}" if bad else ""), flush=True)


def _peak_rss_mb(pid: int) -> float:
    """VmHWM of a process (its peak resident memory), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _Up:
    """One `exfilguard up` in its own process group (a user's terminal): its API key, the outside's
    pid, and its access log (DATA_DIR/access.jsonl: one JSON object per request, with meter_bytes)."""

    def __init__(self, args: argparse.Namespace, extra: list[str]) -> None:
        import re
        import tempfile

        from exfilguard.models.loading import resolve_weak_spec
        from exfilguard.supervise.assemble import free_port

        exe = str(Path(sys.executable).with_name("exfilguard"))
        self.port = free_port()
        data = self.data = Path(tempfile.mkdtemp(prefix="serve-bench-up-"))
        cmd = [exe, "up", "--port", str(self.port), "--data-dir", str(data), "--dashboard-port", str(free_port()),
               "--strong", args.strong, "--weak", resolve_weak_spec(args.weak, args.strong), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.key = self.outside_pid = None
        lines: list[str] = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            lines.append(line)
            if m := re.search(r"API key: (\S+)", line):
                self.key = m.group(1)
            if m := re.search(r"outside pid (\d+)", line):
                self.outside_pid = int(m.group(1))
            if "Ctrl-C stops" in line:
                break
        if self.key is None or self.outside_pid is None:
            self.stop()
            raise SystemExit("exfilguard up did not start:\n" + "".join(lines))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for _ in self.proc.stdout:  # type: ignore[union-attr]
            pass

    def access(self) -> list[dict]:
        path = self.data / "access.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def client(self):  # noqa: ANN201
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=self.key, max_retries=0, timeout=3600)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


UP_FLUSH = 16  # `up stack`: streamed answers flush every this many tokens (up's default)


def up_stack(args: argparse.Namespace, results: dict) -> None:
    """`up stack`: the stack table's batch (--requests prompts, seeds 1000.., --max-tokens, T) through
    `exfilguard up` for each codec of --settings, whole answers then streamed ones (flushing every
    UP_FLUSH tokens), against the strong model alone in its own process (OpenMP's default policy)."""
    prompts = load_prompts(args.requests, args.corpus)
    seeds = list(range(1000, 1000 + len(prompts)))
    alone = alone_in_own_process(args)
    bar = alone["tokens"] / alone["seconds"]
    results["stack: strong alone tok/s"] = round(bar, 1)
    print(f"strong alone (its own process, best of 2): {alone['tokens']} tokens in {alone['seconds']:.1f} s = {bar:.1f} tok/s")
    print("| codec | answers | tok/s | vs alone | meter bits/token | TTFT p50 s | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    codecs = dict.fromkeys(s.partition(":")[0] for s in args.settings.split(","))
    for codec in codecs:
        up = _Up(args, ["--codec", codec, "--flush-every", str(UP_FLUSH)])
        try:
            client = up.client()
            client.completions.create(model=args.model_name, prompt="warm up", max_tokens=2, temperature=0)

            def one(i: int, stream: bool) -> tuple[int, float]:
                t = time.perf_counter()
                if not stream:
                    r = client.completions.create(model=args.model_name, prompt=prompts[i], max_tokens=args.max_tokens,
                                                  seed=seeds[i], temperature=args.temperature)
                    return r.usage.completion_tokens, time.perf_counter() - t
                ttft, n = None, 0
                for ch in client.completions.create(model=args.model_name, prompt=prompts[i], max_tokens=args.max_tokens,
                                                    seed=seeds[i], temperature=args.temperature, stream=True,
                                                    stream_options={"include_usage": True}):
                    if ch.choices and ch.choices[0].text and ttft is None:
                        ttft = time.perf_counter() - t
                    if ch.usage:
                        n = ch.usage.completion_tokens
                return n, ttft if ttft is not None else time.perf_counter() - t

            for stream in (False, True):
                seen = len(up.access())
                t = time.perf_counter()
                with ThreadPoolExecutor(len(prompts)) as ex:
                    res = list(ex.map(lambda i: one(i, stream), range(len(prompts))))
                wall = time.perf_counter() - t
                time.sleep(0.5)  # the access log's last lines
                toks = sum(r[0] for r in res)
                meter = sum(int(a.get("meter_bytes") or 0) for a in up.access()[seen:])
                label = f"streamed (flush every {UP_FLUSH})" if stream else "whole"
                row = {"tok/s": round(toks / wall, 1), "vs alone": round(toks / wall / bar, 2),
                       "meter bits/token": round(8 * meter / max(toks, 1), 2),
                       "TTFT p50 s": round(float(np.median([r[1] for r in res])), 2), "wall s": round(wall, 1)}
                results[f"stack: {codec} {label}"] = row
                print(f"| {codec} | {label} | " + " | ".join(str(v) for v in row.values()) + " |", flush=True)
        finally:
            up.stop()


def up_scenarios(args: argparse.Namespace) -> None:
    """`exfilguard up` as a user runs it: the stack's batch, the long-prompt and the four-at-once scenarios."""
    from exfilguard.models import load_model

    which = [x for x in args.up.split(",") if x]
    results: dict[str, object] = {}
    if "stack" in which:
        up_stack(args, results)
    if not {"long", "short4"} & set(which):
        print(json.dumps(results, indent=1))
        return
    rows = [json.loads(line) for line in open(args.corpus)]
    long_ids: list[int] = []
    for r in rows:  # dev prompts and answers glued together, as one long prompt
        long_ids += list(r["prompt_ids"]) + list(r["token_ids"])
        if len(long_ids) >= args.long_tokens:
            break
    long_ids = long_ids[: args.long_tokens]
    strong = load_model(args.strong, device=args.device)
    tok = strong.tokenizer
    long_text = tok.decode(long_ids, skip_special_tokens=True)
    long_prompt = tok(long_text)["input_ids"]
    results["long prompt tokens"] = len(long_prompt)
    if "long" in which:
        # The strong model's own time for the same request: the inside's engine alone.
        _, alone = strong_alone(strong, [list(long_prompt)], 16, args.temperature, [7])
        results["long: strong alone s"] = round(alone, 1)
        print(json.dumps(results), flush=True)
    if "short4" in which:
        # The strong model's own scaling on this machine: one short request, then four at once
        # (the inside's engine alone, in this process; best of 3 each).
        ids = [tok(rows[i]["prompt"])["input_ids"] for i in range(4)]
        one_s = min(strong_alone(strong, ids[:1], 16, args.temperature, [7])[1] for _ in range(3))
        four_s = min(strong_alone(strong, ids, 16, args.temperature, [7] * 4)[1] for _ in range(3))
        results.update({"short4: strong alone, one s": round(one_s, 2), "short4: strong alone, four s": round(four_s, 2),
                        "short4: strong alone, four / one": round(four_s / one_s, 2)})
    del strong
    up = _Up(args, [])
    try:
        client = up.client()
        client.completions.create(model=args.model_name, prompt="warm up", max_tokens=2, temperature=0)
        results["outside RSS after warm-up MB"] = round(_peak_rss_mb(up.outside_pid), 0)  # type: ignore[arg-type]

        def ask(prompt: object, n: int = 16) -> float:
            t = time.perf_counter()
            r = client.completions.create(model=args.model_name, prompt=prompt, max_tokens=n, temperature=args.temperature, seed=7)
            assert r.choices[0].text is not None
            return time.perf_counter() - t

        if "short4" in which:
            prompts = [rows[i]["prompt"] for i in range(4)]
            one = ask(prompts[0])
            t = time.perf_counter()
            with ThreadPoolExecutor(4) as ex:
                each = list(ex.map(ask, prompts))
            four = time.perf_counter() - t
            results.update({"short4: one alone s": round(one, 2), "short4: four at once, all done s": round(four, 2),
                            "short4: four / one": round(four / one, 2), "short4: each s": [round(x, 2) for x in each]})
            print(json.dumps(results), flush=True)
        if "long" in which:
            took = ask(list(long_prompt))
            results.update({"long: through up s": round(took, 1),
                            "long: up / strong alone": round(took / float(results["long: strong alone s"]), 2),  # type: ignore[arg-type]
                            "long: outside peak RSS MB": round(_peak_rss_mb(up.outside_pid), 0)})  # type: ignore[arg-type]
            print(json.dumps(results), flush=True)
    finally:
        up.stop()
    print(json.dumps(results, indent=1))


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
    ap.add_argument("--decode-rate", default="", help="stream counts: time the outside's decoding alone (see above)")
    ap.add_argument("--codec", default="coupled", help="--decode-rate: the codec to decode")
    ap.add_argument("--flush-every", type=int, default=16, help="--decode-rate: tokens per flush (0: one at the end)")
    ap.add_argument("--up", default="", help="scenarios through `exfilguard up`: stack,long,short4")
    ap.add_argument("--long-tokens", type=int, default=6000, help="--up long: prompt length in tokens")
    ap.add_argument("--model-name", default="smollm2", help="--up: the model name the API serves")
    ap.add_argument("--alone-only", action="store_true", help=argparse.SUPPRESS)  # the strong-alone child (below)
    args = ap.parse_args()
    if args.alone_only:
        from exfilguard.models import load_model

        strong = load_model(args.strong, device=args.device)
        prompts = load_prompts(args.requests, args.corpus)
        runs = [strong_alone(strong, prompts, args.max_tokens, args.temperature, list(range(1000, 1000 + len(prompts)))) for _ in range(2)]
        print(json.dumps({"tokens": sum(len(o) for o in runs[0][0]), "seconds": min(dt for _, dt in runs)}), flush=True)
        return
    if not args.decode_rate and not args.up and os.environ.get("OMP_WAIT_POLICY") is None:
        # The stack runs as `exfilguard up` runs the inside on a CPU: OpenMP threads that sleep
        # when idle instead of spinning (inside/serve.py), so the encoders get the cores.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if args.decode_rate:
        decode_rate(args)
        return
    if args.up:
        up_scenarios(args)
        return

    from exfilguard.models.loading import load_models, resolve_weak_spec

    weak_spec = resolve_weak_spec(args.weak, args.strong)
    strong, weak = load_models(args.strong, weak_spec, args.device)
    prompts = load_prompts(args.requests, args.corpus)
    seeds = list(range(1000, 1000 + len(prompts)))
    outs, alone_s = strong_alone(strong, prompts, args.max_tokens, args.temperature, seeds)
    alone_s = min(alone_s, strong_alone(strong, prompts, args.max_tokens, args.temperature, seeds)[1])
    alone_toks = sum(len(o) for o in outs)
    ideal = ideal_bits(weak, prompts, outs)
    default = alone_in_own_process(args)  # the faster of this and the in-process run is the bar
    print(f"strong {args.strong}, weak {weak_spec}, device {args.device}, {len(prompts)} requests x <= {args.max_tokens} tokens, "
          f"T={args.temperature}, concurrency {args.concurrency}")
    print(f"strong alone (best of 2): {alone_toks} tokens in {alone_s:.1f} s = {alone_toks / alone_s:.1f} tok/s with "
          f"OMP_WAIT_POLICY=PASSIVE (as `up` runs the inside), {default['tokens'] / default['seconds']:.1f} tok/s in its own "
          f"process with OpenMP's default policy; 'vs alone' compares with the faster")
    alone_s = min(alone_s, default["seconds"] * alone_toks / max(default["tokens"], 1))
    print(f"weak-model ideal (cross-entropy) {ideal / alone_toks:.2f} bits/token")
    print("| codec | flush every | meter bits/token | UTF-8 text bits/token | meter / ideal | tok/s | vs alone | req/s | TTFT p50 s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    where: list[str] = []
    for s in args.settings.split(","):
        codec, _, rest = s.partition(":")
        flush, _, ms = rest.partition(":")
        r = run_setting(strong, weak, prompts, seeds, args, codec, int(flush or 0), float(ms or 0))
        n = max(r["tokens"], 1)
        tps = r["tokens"] / r["wall_s"]
        label = (r['flush'] or 'end') if not ms else f'{flush} or {ms} ms'
        print(f"| {codec} | {label} | {8 * r['meter_bytes'] / n:.2f} | {8 * r['text_bytes'] / n:.1f} | "
              f"{8 * r['meter_bytes'] / max(ideal * n / alone_toks, 1e-9):.2f} | {tps:.1f} | {tps / (alone_toks / alone_s):.2f} | "
              f"{len(prompts) / r['wall_s']:.2f} | {r['ttft_p50_s']:.2f} |", flush=True)
        where.append(f"{codec} {label}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU (this process: inside, "
                     f"meter stand-in, outside) = {r['cpu_s'] / r['wall_s']:.2f} cores busy; engine: "
                     + ", ".join(f"{k} {v:.1f} s" for k, v in r["step_seconds"].items()))
    print("\n".join(where))


if __name__ == "__main__":
    main()
