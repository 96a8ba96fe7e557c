"""The match model's per-length weights from a corpus, and what the mixture buys.

    python bench/match_weights.py --fit data/smollm2_train.jsonl.gz \
        --eval ../shared/data/smollm2_corpus_dev.jsonl [--speed 2000] [--model SPEC]

Prints the hit rate h_L of the match prediction per length bucket on the --fit corpus (no model
needed: it is a property of the text), the weights round(256 h_L^2) (copy them into
exfilguard/models/match.py if they differ), and, per temperature of the eval file, the ideal
bits per token of --model alone and mixed with the shipped weights.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from exfilguard.models import load_model
from exfilguard.models import match as M
from exfilguard.models.distill import first_per_temperature, read_corpus

_ROOT = Path(__file__).resolve().parent.parent

LN2 = math.log(2)


def collect(model, rows, desc):
    """Per generated token: (log q(token), bucket, hit, temperature); bucket -1: no match."""
    out = []
    for r in tqdm(rows, desc=desc, unit="gen"):
        if not r.token_ids:
            continue
        lg = torch.log_softmax(torch.from_numpy(model.score_fast(r.prompt_ids, r.token_ids)).double(), -1).numpy()
        for i, (t, (tok, length)) in enumerate(zip(r.token_ids, M.predictions(r.prompt_ids, r.token_ids))):
            b = M.bucket(length) if tok >= 0 else -1
            out.append((lg[i, t], b, float(tok == t), r.temperature))
    return np.array(out)


def bits(rec, weights):
    lq, b, hit = rec[:, 0], rec[:, 1].astype(int), rec[:, 2]
    w = np.where(b >= 0, np.asarray(weights, dtype=float)[np.maximum(b, 0)] / 256, 0.0)
    p = (1 - w) * np.exp(lq) + w * hit
    return float(-np.log(p).sum() / LN2 / len(rec))


def speed(model, rows, n):
    """Incremental (the codec's path) tokens/s of `model` alone and mixed, over n dev tokens."""
    out = []
    for m in (model, M.MatchModel(model)):
        done, t0 = 0, time.perf_counter()
        for r in rows:
            s = m.session(r.prompt_ids)
            for t in r.token_ids[: n - done]:
                s.logits()
                s.feed(t)
                done += 1
            if done >= n:
                break
        out.append(done / (time.perf_counter() - t0))
    return out


def hit_rates(rows):
    """Per length bucket, how often the match prediction is the next generated token."""
    hits, total = np.zeros(len(M.EDGES)), np.zeros(len(M.EDGES))
    for r in rows:
        for t, (tok, length) in zip(r.token_ids, M.predictions(r.prompt_ids, r.token_ids)):
            if tok >= 0:
                total[M.bucket(length)] += 1
                hits[M.bucket(length)] += tok == t
    return hits / np.maximum(total, 1), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", default=str(_ROOT / "data" / "smollm2_train.jsonl.gz"), help="corpus to fit on (the training corpus)")
    ap.add_argument("--eval", default=str(_ROOT / "data" / "smollm2_corpus_dev_sample.jsonl"), help="corpus to measure on (the dev file; default: the 60-row sample in the repo)")
    ap.add_argument("--eval-limit", type=int, default=0, help="first N rows per temperature (0: all)")
    ap.add_argument("--model", default="student:src/exfilguard/data/default_student/student.npz")
    ap.add_argument("--speed", type=int, default=0, help="also time N incremental steps alone and mixed")
    args = ap.parse_args()
    rates, total = hit_rates(read_corpus([args.fit]))
    print("length buckets from", M.EDGES)
    print("tokens per bucket", total.astype(int).tolist())
    print("hit rates", np.round(rates, 3).tolist())
    print("weights round(256 h^2) =", tuple(int(round(256 * h * h)) for h in rates))
    print("shipped WEIGHTS        =", M.WEIGHTS)
    model = load_model(args.model)
    rows = first_per_temperature(read_corpus([args.eval]), args.eval_limit)
    if args.speed:
        alone, mixed = speed(model, rows, args.speed)
        print(f"incremental: {alone:.1f} tok/s alone, {mixed:.1f} tok/s with the match model "
              f"(+{1000 / mixed - 1000 / alone:.2f} ms/token)")
    rec = collect(model, rows, "eval")
    print(f"| T | tokens | {args.model} | with the match model |\n| --- | --- | --- | --- |")
    for temp in sorted(set(rec[:, 3])):
        r = rec[rec[:, 3] == temp]
        print(f"| {temp:g} | {len(r)} | {bits(r, [0] * len(M.EDGES)):.3f} | {bits(r, M.WEIGHTS):.3f} |")


if __name__ == "__main__":
    main()
