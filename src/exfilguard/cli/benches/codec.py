"""`exfilguard bench codec`: code every generation of a corpus as its own stream and measure.

Each generation is encoded (header, one chunk at the default flush, end record), decoded
and compared with the original ids. Bits per token count every byte of the stream.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exfilguard.codec.codecs import Codec, ModelCodec
from exfilguard.codec.registry import get_codec
from exfilguard.codec.stream import Decoder, Encoder
from exfilguard.errors import ConfigError, Desync, FrameCorrupt

BASELINES = ("raw", "zstd", "zstd-dict", "zstd-ids")


@dataclass
class BenchConfig:
    corpus: Path
    weak: str | None = None
    limit: int | None = None  # generations per temperature
    codecs: Sequence[str] | None = None
    flush_every: int | None = None
    encoder: str = "teacher-forced"  # or "incremental"
    encode_threads: int = 1
    decode_threads: int = 2
    decode_limit: int | None = None  # model codec: decode only the first N per temperature


@dataclass
class _Acc:
    generations: int = 0
    tokens: int = 0
    bytes: int = 0
    ok: int = 0
    failures: int = 0
    desync_streams: int = 0
    resend_bytes: int = 0
    enc_s: float = 0.0
    dec_s: float = 0.0
    ideal_bits: float = 0.0
    target_misses: int = 0
    decoded: int = 0
    dec_tokens: int = 0

    def add(self, other: "_Acc") -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def report(self, with_ideal: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bits_per_token": 8 * self.bytes / max(self.tokens, 1),
            "roundtrip_ok": self.failures == 0 and self.desync_streams == 0,
            "encode_tokens_per_s": self.tokens / self.enc_s if self.enc_s else 0.0,
            "decode_tokens_per_s": self.dec_tokens / self.dec_s if self.dec_s else 0.0,
            "decoded_generations": self.decoded,
            "stream_bytes": self.bytes,
            "desync_streams": self.desync_streams,
            "roundtrip_failures": self.failures,
            "resend_bytes": self.resend_bytes,
        }
        if with_ideal:
            out["ideal_bits_per_token"] = self.ideal_bits / max(self.tokens, 1)
            bound = 1.03 * self.ideal_bits + 64 * self.generations
            out["target_bits"] = bound
            out["stream_bits"] = 8 * self.bytes
            out["within_target"] = 8 * self.bytes <= bound
            out["generations_over_target"] = self.target_misses
        return out


@dataclass
class _Row:
    temperature: float
    prompt_ids: list[int]
    token_ids: list[int]


def load_corpus(path: Path, limit: int | None) -> list[_Row]:
    """Rows of a corpus file; `limit` keeps the first N of each temperature."""
    if not path.is_file():
        raise ConfigError(f"corpus file {path} does not exist")
    rows: list[_Row] = []
    seen: dict[float, int] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                row = _Row(float(r["temperature"]), [int(t) for t in r["prompt_ids"]], [int(t) for t in r["token_ids"]])
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{path}:{n}: not a corpus row ({exc})") from None
            if limit is not None and seen.get(row.temperature, 0) >= limit:
                continue
            seen[row.temperature] = seen.get(row.temperature, 0) + 1
            rows.append(row)
    return rows


def _ideal_bits(model: Any, prompt: list[int], toks: list[int]) -> float:
    """Sum of -log2 q(token) under the weak model's unquantized distribution."""
    import torch

    logits = torch.from_numpy(np.asarray(model.score_fast(prompt, toks), dtype=np.float64))
    lp = torch.log_softmax(logits, dim=-1)[torch.arange(len(toks)), torch.tensor(toks)]
    return float(-lp.sum()) / math.log(2)


def _set_threads(n: int) -> None:
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass


def _code_one(codec: Codec, dec_codec: Codec, row: _Row, sid: int, cfg: BenchConfig, decode: bool = True) -> _Acc:
    acc = _Acc(generations=1, tokens=len(row.token_ids))
    _set_threads(cfg.encode_threads)
    ideal0 = codec.stats.ideal_s if isinstance(codec, ModelCodec) else 0.0
    t = time.perf_counter()
    enc = Encoder(codec, row.prompt_ids, stream_id=sid, flush_every=cfg.flush_every)
    data = enc.push_many(row.token_ids) + enc.finish()
    acc.enc_s = time.perf_counter() - t
    if isinstance(codec, ModelCodec):
        acc.enc_s -= codec.stats.ideal_s - ideal0  # measuring ideal bits is not encoding
    acc.bytes = len(data)
    if not decode:
        return acc
    acc.decoded, acc.dec_tokens = 1, len(row.token_ids)
    _set_threads(cfg.decode_threads)
    t = time.perf_counter()
    dec = Decoder(dec_codec, row.prompt_ids, stream_id=sid)
    out: list[int] = []
    desynced = False
    try:
        try:
            dec.feed(data)
        except Desync as exc:
            desynced = True
            idx = exc.chunk_index
            while True:
                raw = enc.raw_chunk(idx)
                acc.resend_bytes += len(raw)
                try:
                    dec.resend(idx, raw)
                    break
                except Desync as again:
                    idx = again.chunk_index
        out = dec.finish()
    except FrameCorrupt:
        out = []
    acc.dec_s = time.perf_counter() - t
    if desynced:
        acc.desync_streams = 1
    if out == row.token_ids and not desynced:
        acc.ok = 1
    else:
        acc.failures = int(out != row.token_ids)
    return acc


def run(cfg: BenchConfig, progress: Any = None) -> dict[str, Any]:
    """The benchmark's JSON object (see `exfilguard bench codec --help`)."""
    rows = load_corpus(cfg.corpus, cfg.limit)
    if not rows:
        raise ConfigError(f"corpus {cfg.corpus} has no generations")
    names = list(cfg.codecs) if cfg.codecs else list(BASELINES) + (["model"] if cfg.weak else [])
    model = None
    if "model" in names:
        if not cfg.weak:
            raise ConfigError("the model codec needs --weak SPEC")
        from exfilguard.models import load_model

        model = load_model(cfg.weak)
    if cfg.encoder not in ("teacher-forced", "incremental"):
        raise ConfigError("--encoder must be teacher-forced or incremental")
    temps = sorted({r.temperature for r in rows})
    accs: dict[tuple[float, str], _Acc] = {(t, n): _Acc() for t in temps for n in names}
    for name in names:
        if name == "model":
            codec: Codec = ModelCodec(model, teacher_forced=cfg.encoder == "teacher-forced", measure_ideal=True)
            dec_codec: Codec = ModelCodec(model)
        else:
            codec = dec_codec = get_codec(name, weak_model=model)
        seen: dict[float, int] = {}
        for sid, row in enumerate(rows):
            k = seen[row.temperature] = seen.get(row.temperature, 0) + 1
            decode = name != "model" or cfg.decode_limit is None or k <= cfg.decode_limit
            if name == "model":
                before = codec.stats.ideal_bits  # type: ignore[attr-defined]
            a = _code_one(codec, dec_codec, row, sid, cfg, decode)
            if name == "model":
                if cfg.encoder == "teacher-forced":
                    a.ideal_bits = codec.stats.ideal_bits - before  # type: ignore[attr-defined]
                else:
                    _set_threads(cfg.encode_threads)
                    a.ideal_bits = _ideal_bits(model, row.prompt_ids, row.token_ids)
                a.target_misses = int(8 * a.bytes > 1.03 * a.ideal_bits + 64)
            accs[(row.temperature, name)].add(a)
            if progress is not None:
                progress(name, sid + 1, len(rows))
    result: dict[str, Any] = {
        "generations": len(rows),
        "tokens": sum(len(r.token_ids) for r in rows),
        "weak": cfg.weak,
        "encoder": cfg.encoder,
        "encode_threads": cfg.encode_threads,
        "decode_threads": cfg.decode_threads,
        "flush_every": cfg.flush_every,
        "decode_limit": cfg.decode_limit,
        "by_temperature": {},
    }
    total = {n: _Acc() for n in names}
    for t in temps:
        sel = [r for r in rows if r.temperature == t]
        entry: dict[str, Any] = {"generations": len(sel), "tokens": sum(len(r.token_ids) for r in sel), "codecs": {}}
        for n in names:
            entry["codecs"][n] = accs[(t, n)].report(n == "model")
            total[n].add(accs[(t, n)])
        result["by_temperature"][_tkey(t)] = entry
    result["all"] = {
        "generations": result["generations"],
        "tokens": result["tokens"],
        "codecs": {n: total[n].report(n == "model") for n in names},
    }
    return result


def _tkey(t: float) -> str:
    return f"{t:g}"
