"""`bench coupled` over several weak models and temperatures, on shared generations.

The strong model generates once per temperature (seeded, the same sampler the inside uses);
every weak model then codes those same generations with `model` and `coupled`. Prints one
table and, with --json, one JSON object {"T": {"weak": <bench coupled --json object>}}.

    .venv/bin/python bench/coupled_matrix.py --strong smollm2 \\
        --weak ngram:/tmp/ngram4.npz --weak default --weak smollm2 \\
        --prompts ../shared/data/smollm2_corpus_dev.jsonl --limit 8 --max-tokens 96 \\
        --temperature 0 --temperature 0.7 --temperature 1.0

--cache DIR keeps each temperature's generations (tokens, strong logits, seeds) in
DIR/gen_T{T}_n{limit}_m{max_tokens}_s{seed}.npz and reuses them: the strong model's incremental
generation is the slow part on a shared CPU, and new weak models or codec versions can then be
compared on the very same samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from exfilguard.cli.benches.coupled import CoupledBenchConfig, generate_all, load_prompts, run
from exfilguard.models.specs import load_model


def _cache_path(args: argparse.Namespace, t: float) -> Path:
    return args.cache / f"gen_T{t:g}_n{args.limit}_m{args.max_tokens}_s{args.seed}.npz"


def _cached(args: argparse.Namespace, t: float, prompts: list[list[int]]) -> list | None:
    path = _cache_path(args, t)
    if not path.is_file():
        return None
    d = np.load(path)
    if [d[f"prompt{i}"].tolist() for i in range(len(prompts)) if f"prompt{i}" in d] != prompts:
        raise SystemExit(f"{path}: its prompts are not this run's")
    return [(d[f"toks{i}"].tolist(), d[f"strong{i}"], int(d[f"seed{i}"])) for i in range(len(prompts))]


def _save(args: argparse.Namespace, t: float, prompts: list[list[int]], gens: list) -> None:
    args.cache.mkdir(parents=True, exist_ok=True)
    data: dict = {}
    for i, (p, (toks, logits, seed)) in enumerate(zip(prompts, gens)):
        data.update({f"prompt{i}": np.array(p), f"toks{i}": np.array(toks), f"strong{i}": logits, f"seed{i}": seed})
    np.savez(_cache_path(args, t), **data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strong", default="smollm2")
    ap.add_argument("--weak", action="append", required=True, help="weak-model spec (repeat)")
    ap.add_argument("--prompts", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "smollm2_corpus_dev_sample.jsonl")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, action="append", required=True, help="repeat")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cache", type=Path, default=None, help="folder to keep / reuse the generations in")
    args = ap.parse_args()

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    strong = load_model(args.strong)
    weaks = {spec: (strong if spec == args.strong else load_model(spec)) for spec in args.weak}
    log(f"loaded {args.strong} and {len(weaks)} weak models")
    prompts = load_prompts(args.prompts, args.limit)
    results: dict[str, dict[str, dict]] = {}
    for t in args.temperature:
        cfg = CoupledBenchConfig(args.strong, args.weak[0], args.prompts, args.limit, args.max_tokens, t, 1.0, args.seed)
        gens = _cached(args, t, prompts) if args.cache else None
        if gens is None:
            gens = generate_all(strong, prompts, cfg)
            if args.cache:
                _save(args, t, prompts, gens)
        log(f"T={t}: generated {sum(len(g[0]) for g in gens)} tokens")
        results[str(t)] = {}
        for spec, weak in weaks.items():
            cfg.weak = spec
            r = run(cfg, strong=strong, weak=weak, generations=gens)
            results[str(t)][spec] = r
            c = r["codecs"]
            log(
                f"T={t} weak={spec}: model {c['model']['bits_per_token']:.3f} coupled {c['coupled']['bits_per_token']:.3f} "
                f"KL {r['kl_bits_per_token']:.3f} CE {r['cross_entropy_bits_per_token']:.3f} agree {r['agreement']:.3f} "
                f"ok {c['model']['roundtrip_ok']}/{c['coupled']['roundtrip_ok']}"
            )
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("| T | weak | tokens | model bits/tok | coupled bits/tok | coupled/model | KL bits/tok | CE bits/tok | agreement | roundtrip |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for t, row in results.items():
        for spec, r in row.items():
            m, c = r["codecs"]["model"], r["codecs"]["coupled"]
            ratio = c["bits_per_token"] / m["bits_per_token"] if m["bits_per_token"] else float("nan")
            print(
                f"| {t} | {spec} | {r['tokens']} | {m['bits_per_token']:.3f} | {c['bits_per_token']:.3f} | {ratio:.2f} | "
                f"{r['kl_bits_per_token']:.3f} | {r['cross_entropy_bits_per_token']:.3f} | {r['agreement']:.3f} | "
                f"{'ok' if m['roundtrip_ok'] and c['roundtrip_ok'] else 'FAILED'} |"
            )


if __name__ == "__main__":
    main()
