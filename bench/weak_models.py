"""Bits per generated token (ideal, -log2 q, teacher-forced) of weak and strong models on the
dev corpus, per temperature. Usage:

    python bench/weak_models.py --dev ../shared/data/smollm2_corpus_dev.jsonl \
        --model ngram:/tmp/ngram4.npz --model default --model smollm2 [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from exfilguard.models import load_model
from exfilguard.models.distill import (
    evaluate,
    first_per_temperature,
    format_table,
    read_corpus,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev", default=str(Path(__file__).resolve().parent.parent / "data" / "smollm2_corpus_dev_sample.jsonl"))
    ap.add_argument("--model", action="append", required=True, help="model spec (repeat)")
    ap.add_argument("--device", default="cpu", help="device for transformer models (the n-gram is CPU)")
    ap.add_argument("--limit", type=int, default=0, help="first N dev rows per temperature (0: all)")
    args = ap.parse_args()
    rows = first_per_temperature(read_corpus([args.dev]), args.limit)
    table = {}
    for spec in args.model:
        t0 = time.time()
        m = load_model(spec, device=args.device if not spec.startswith("ngram") else "cpu")
        table.update(evaluate([m], rows))
        print(f"{spec}: {time.time() - t0:.0f} s", flush=True)
    print(format_table(table))


if __name__ == "__main__":
    main()
