"""Codec-level streaming benchmark: stream format v2 against v1 on the dev corpus.

For each generation: bytes of the stream at one flush per answer and at one flush every N
tokens (the codec's own bytes plus what the wire adds per flush: protocol v2 DATA frames of
implied length, 1 + payload bytes, or 2 + payload), how many tokens the decoder can show right
after each flush, and the codec's own CPU time per token (the weak model's tables are
computed once, outside the timing, and replayed).

    python bench/stream_bench.py --weak default --limit 5 --flush 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from exfilguard.codec import Decoder, Encoder, get_codec
from exfilguard.protocol.wire import Kind, data_cut, encode_frame

CORPUS = Path(__file__).resolve().parent.parent / "data" / "smollm2_corpus_dev_sample.jsonl"


class _Replay:
    """A weak model that replays precomputed exact tables (so timing is the codec's alone)."""

    def __init__(self, model, prompt, tokens):  # noqa: ANN001
        s = model.session(prompt)
        self.rows = []
        for t in tokens:
            self.rows.append(np.asarray(s.frequencies()))
            s.feed(t)
        self.rows.append(np.asarray(s.frequencies()))
        self.vocab_size = model.vocab_size
        self.fingerprint = model.fingerprint
        self._exfilguard_tables_exact = True

    def session(self, prefix):  # noqa: ANN001
        return _ReplaySession(self)


class _ReplaySession:
    def __init__(self, m: _Replay):
        self.m, self.i = m, 0

    def feed(self, t: int) -> None:
        self.i += 1

    def frequencies(self) -> np.ndarray:
        return self.m.rows[self.i]

    def logits(self) -> np.ndarray:
        return self.m.rows[self.i].astype(np.float32)


def wire_bytes(enc: Encoder, tokens: list[int], flush: int | None) -> tuple[int, int, list[bytes]]:
    """(codec bytes, wire bytes, the flushes' payloads), shipping as the inside does."""
    held, wire, codec, parts = b"", 0, 0, []
    for i, t in enumerate(tokens):
        held += enc.push(t)
        if flush and (i + 1) % flush == 0:
            out = held + enc.flush()
            n = data_cut(len(out)) if enc.version == 2 else len(out)
            send, held = out[:n], out[n:]
            if send:
                wire += len(encode_frame(Kind.DATA, 1, send))
                codec += len(send)
            parts.append(send)
    last = held + enc.finish()
    wire += len(encode_frame(Kind.END, 1, last))
    codec += len(last)
    parts.append(last)
    return codec, wire, parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weak", default="default")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--limit", type=int, default=5, help="generations per temperature")
    ap.add_argument("--flush", type=int, default=16)
    ap.add_argument("--codec", default="model", help="model, or coupled (whose figures need tokens from its own sampler)")
    args = ap.parse_args()

    from exfilguard.models.loading import load_models

    _, weak = load_models(None, args.weak, "cpu")
    rows = [json.loads(line) for line in args.corpus.read_text().splitlines() if line.strip()]
    per_t: dict[float, list[dict]] = {}
    for r in rows:
        per_t.setdefault(float(r["temperature"]), [])
        if len(per_t[float(r["temperature"])]) < args.limit:
            per_t[float(r["temperature"])].append(r)
    print(f"weak {args.weak}, codec {args.codec}, flush every {args.flush}, {args.limit} generations per temperature")
    print("| T | tokens | ideal bits/tok | v2 whole | v2 flush | v1 whole | v1 flush | shown after flushes (v2) | v2 codec ms/token enc+dec |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for temp, rs in sorted(per_t.items()):
        tot = {"n": 0, "ideal": 0.0, "v2w": 0, "v2f": 0, "v1w": 0, "v1f": 0, "shown": 0, "due": 0, "cpu": 0.0}
        for r in rs:
            prompt, toks = r["prompt_ids"], r["token_ids"]
            rep = _Replay(weak, prompt, toks)
            c = get_codec(args.codec, weak_model=rep)
            if args.codec == "coupled":
                c = c.for_request(int(r.get("seed", 0)), temp)
            tot["n"] += len(toks)
            tot["ideal"] += sum(float(np.log2(rep.rows[i].sum() / rep.rows[i][t])) for i, t in enumerate(toks))
            t0 = time.process_time()
            _, w2f, parts = wire_bytes(Encoder(c, prompt, version=2), toks, args.flush)
            dec = Decoder(c, prompt)
            shown = 0
            for k, p in enumerate(parts[:-1]):
                shown += len(dec.feed(p))
                tot["shown"] += shown
                tot["due"] += (k + 1) * args.flush
            rest = dec.feed(parts[-1]) + dec.close()
            assert dec.tokens == toks and shown + len(rest) == len(toks)
            tot["cpu"] += time.process_time() - t0
            tot["v2f"] += w2f
            tot["v2w"] += wire_bytes(Encoder(c, prompt, version=2), toks, None)[1]
            tot["v1w"] += wire_bytes(Encoder(c, prompt, version=1), toks, None)[1]
            tot["v1f"] += wire_bytes(Encoder(c, prompt, version=1), toks, args.flush)[1]
        n = tot["n"]
        ideal = tot["ideal"] / n
        fmt = lambda b: f"{8 * b / n:.2f} ({8 * b / n / ideal:.2f}x)"  # noqa: E731
        print(f"| {temp:g} | {n} | {ideal:.3f} | {fmt(tot['v2w'])} | {fmt(tot['v2f'])} | {fmt(tot['v1w'])} | {fmt(tot['v1f'])} | "
              f"{tot['shown'] / max(tot['due'], 1):.1%} | {1000 * tot['cpu'] / n:.2f} |", flush=True)


if __name__ == "__main__":
    main()
