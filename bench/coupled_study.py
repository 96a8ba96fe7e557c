"""How far below the coupled codec can a per-token coder go? An offline study on dev generations.

    python bench/coupled_study.py --dev ../shared/data/smollm2_corpus_dev.jsonl \\
        --temperature 0.7 --limit 3 --weak default

The coupled codec codes the strong token x_t given the shared Gumbel noise G_t and the weak
logits. Generating seeded samples incrementally with SmolLM2 is slow on a shared CPU, so this
study uses the dev file's generations (SmolLM2 samples at the same temperature) teacher-forced
and draws G_t from its posterior given the token: the maximum of log p_T + G is Gumbel(0) and
independent of the argmax, the other entries are Gumbels truncated below it (the top-down
construction of Gumbel-max). (x_t, G_t) then has exactly the joint law of the inside's sampler,
so every coding cost below is what the codec would see, up to which noise values were drawn.

Per position it records -log q(x) (tempered and untempered), -log softmax(u / tau)(x) for the
perturbed weak scores u = logits_weak + T * G over a range of tau, a geometric variant
softmax((u + beta * logits_weak) / tau), and the rank of x among u. It prints, in bits per
token against the KL bound:
  * the current codec's family (lambda * softmax(u / tau) + (1 - lambda) * q, its seven
    (tau, lambda) modes, the best mode per stream; float64, without the integer rounding),
  * the oracle mixture of every component, weights fitted by EM on the very positions scored
    (a lower bound for any fixed mixture of them), globally and per bucket of the perturbed-score
    gap, the weak entropy or the weak top probability,
  * an adaptive rank coder (Elias-gamma-like rank buckets with counts learned on the other
    streams and updated on the coded one, uniform within a bucket), plain and per gap bucket.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from exfilguard.codec import coupled as C
from exfilguard.models.specs import load_model

TAUS = (0.05, 0.15, 0.3, 0.5, 0.8, 1.2, 1.8, 3.0)
GEOMETRIC = ((0.5, 0.3), (0.5, 0.8), (0.5, 1.5))  # (beta, tau)
LN2 = math.log(2)


def records(strong, weak, rows: list[dict], temp: float, seed: int) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    comp, kl, rank, gap, ent, top, stream = [], [], [], [], [], [], []
    for gi, r in enumerate(rows):
        S = torch.from_numpy(np.asarray(strong.score_fast(r["prompt_ids"], r["token_ids"]), dtype=np.float64))
        W = torch.from_numpy(np.asarray(weak.score_fast(r["prompt_ids"], r["token_ids"]), dtype=np.float64))
        lp, lq, lq1 = torch.log_softmax(S / temp, -1), torch.log_softmax(W / temp, -1), torch.log_softmax(W, -1)
        kl += ((lp.exp() * (lp - lq)).sum(-1) / LN2).tolist()
        tt = torch.tensor(TAUS, dtype=torch.float64)[:, None]
        for t, x in enumerate(r["token_ids"]):
            a = lp[t]
            m = -torch.log(-torch.log(torch.rand(1, generator=gen, dtype=torch.float64)))
            g = a - torch.log(-torch.log(torch.rand(a.shape, generator=gen, dtype=torch.float64)))
            z = -torch.logaddexp(-m, -g)
            z[x] = m
            u = W[t] + temp * (z - a)
            srt = torch.topk(u, 2).values
            c = [float(lq[t, x]), float(lq1[t, x])]
            c += (u[x] / tt[:, 0] - torch.logsumexp(u[None, :] / tt, -1)).tolist()
            c += [float(torch.log_softmax((u + b * W[t]) / tau, -1)[x]) for b, tau in GEOMETRIC]
            comp.append(c)
            rank.append(int((u > u[x]).sum()))
            gap.append(float(srt[0] - srt[1]))
            ent.append(float(-(lq[t].exp() * lq[t]).sum()))
            top.append(float(lq[t].max()))
            stream.append(gi)
    return {k: np.asarray(v) for k, v in dict(comp=comp, kl=kl, rank=rank, gap=gap, ent=ent, top=top, stream=stream).items()}


def _lse(a: np.ndarray) -> np.ndarray:
    m = a.max(1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(1, keepdims=True)))[:, 0]


def oracle_mixture_bits(L: np.ndarray, iters: int = 300) -> float:
    """Total bits of the best fixed mixture of the columns of L (log-probs), fitted by EM on L."""
    w = np.full(L.shape[1], 1.0 / L.shape[1])
    for _ in range(iters):
        a = L + np.log(w + 1e-300)
        w = np.exp(a - _lse(a)[:, None]).mean(0)
    return float(-_lse(L + np.log(w + 1e-300)).sum() / LN2)


def adaptive_rank_bits(rank: np.ndarray, ctx: np.ndarray, stream: np.ndarray) -> float:
    """Rank buckets 0, 1, 2-3, 4-7, ... with KT counts from the other streams, updated as coded."""
    rb = np.floor(np.log2(rank + 1)).astype(int)
    total = 0.0
    for s in np.unique(stream):
        cnt = np.full((ctx.max() + 1, 18), 0.5)
        np.add.at(cnt, (ctx[stream != s], rb[stream != s]), 1)
        for i in np.flatnonzero(stream == s):
            total += -math.log2(cnt[ctx[i], rb[i]] / cnt[ctx[i]].sum()) + rb[i]
            cnt[ctx[i], rb[i]] += 1
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev", required=True)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--limit", type=int, default=3, help="first N dev generations at this temperature")
    ap.add_argument("--weak", default="default")
    ap.add_argument("--strong", default="smollm2")
    ap.add_argument("--seed", type=int, default=0, help="seed of the posterior noise draws")
    args = ap.parse_args()
    with open(args.dev) as fh:
        rows = [r for r in map(json.loads, fh) if r["temperature"] == args.temperature and r["token_ids"]][: args.limit]
    rec = records(load_model(args.strong), load_model(args.weak), rows, args.temperature, args.seed)
    L, kl, n = rec["comp"], rec["kl"], len(rec["kl"])
    klb = kl.sum()
    out = {"tokens": n, "kl_bits_per_token": klb / n, "agreement": float((rec["rank"] == 0).mean())}
    names = ["q_T", "q_1"] + [f"s{t}" for t in TAUS] + [f"geo{b},{t}" for b, t in GEOMETRIC]
    out["component bits/token"] = {nm: round(float(-L[:, j].mean() / LN2), 3) for j, nm in enumerate(names)}
    for plain in (0, 1):  # the codec's family, plain = tempered / untempered weak table
        per_mode = []
        for tau, lam in zip(C.TAUS, C.LAMBDAS):
            j = names.index(f"s{tau}")
            a = np.logaddexp(math.log(lam / 256) + L[:, j], math.log(1 - lam / 256) + L[:, plain])
            per_mode.append([-a[rec["stream"] == s].sum() / LN2 for s in np.unique(rec["stream"])])
        per_mode.append([-L[rec["stream"] == s, plain].sum() / LN2 for s in np.unique(rec["stream"])])
        best = float(np.min(np.asarray(per_mode), 0).sum())
        out[f"codec family (plain {names[plain]}), best mode per stream"] = (round(best / n, 4), round(best / klb, 3))
    b = oracle_mixture_bits(L)
    out["oracle mixture of all components"] = (round(b / n, 4), round(b / klb, 3))
    for feat, edges in (("gap", [0.25, 0.5, 1, 2, 4]), ("ent", [0.3, 1, 2, 3]), ("top", [-2, -1, -0.5, -0.2])):
        bucket = np.digitize(rec[feat], edges)
        b = sum(oracle_mixture_bits(L[bucket == k]) for k in np.unique(bucket))
        out[f"oracle mixture per {feat} bucket"] = (round(b / n, 4), round(b / klb, 3))
        if feat == "gap":
            r = adaptive_rank_bits(rec["rank"], bucket, rec["stream"])
            out["adaptive rank coder per gap bucket"] = (round(r / n, 4), round(r / klb, 3))
    r = adaptive_rank_bits(rec["rank"], np.zeros(n, dtype=int), rec["stream"])
    out["adaptive rank coder"] = (round(r / n, 4), round(r / klb, 3))
    print(json.dumps(out, indent=1))
    print("(pairs: bits/token, x KL)")


if __name__ == "__main__":
    main()
