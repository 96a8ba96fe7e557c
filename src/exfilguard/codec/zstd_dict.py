"""Train the zstd dictionary shipped as exfilguard/data/zstd_dict_smollm2.bin.

    python -m exfilguard.codec.zstd_dict [--train ../shared/data/smollm2_train.jsonl.gz] [--out PATH]

Trained on the training corpus only (never the dev file the benchmark evaluates on): the
generated token ids of every row, as the UTF-8 bytes the zstd codec compresses.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

DEFAULT_TRAIN = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "smollm2_train.jsonl.gz"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data" / "zstd_dict_smollm2.bin"
DICT_SIZE = 64 * 1024 - 1024  # stays under 64 KiB


def train(train_path: Path, size: int = DICT_SIZE) -> bytes:
    """A zstd dictionary of at most `size` bytes from the generations' text (deterministic)."""
    import zstandard

    from exfilguard.codec.text import smollm2_text

    text = smollm2_text()
    opener = gzip.open if str(train_path).endswith(".gz") else open
    samples = []
    with opener(train_path, "rt") as f:
        for line in f:
            row = json.loads(line)
            samples.append(text.to_bytes(row["token_ids"]))
    d = zstandard.train_dictionary(size, samples, level=19, threads=1)
    return d.as_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, default=DEFAULT_TRAIN)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--size", type=int, default=DICT_SIZE)
    args = ap.parse_args()
    data = train(args.train, args.size)
    args.out.write_bytes(data)
    print(f"wrote {len(data)} bytes to {args.out}")


if __name__ == "__main__":
    main()
