"""`exfilguard verify`: re-run a random sample of logged answers with a trusted strong model."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exfilguard.errors import ConfigError, LogCorrupt
from exfilguard.verify.requestlog import AlertRecord, RequestRecord, read_log
from exfilguard.verify.scoring import Score, Thresholds, judge, method_for


@dataclass
class VerifyConfig:
    """What to check and how strictly."""

    sample_rate: float = 1.0
    sample_seed: int | None = None  # None: a fresh secret one (printed, so a run can be repeated)
    thresholds: Thresholds = field(default_factory=Thresholds)
    unseeded: bool = False  # score every sampled answer by likelihood, ignoring seeds

    def validate(self) -> None:
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError(f"--sample-rate {self.sample_rate} must be in (0, 1]")


@dataclass
class VerifyReport:
    """Per-answer scores and totals."""

    log: str
    sample_rate: float
    sample_seed: int
    records: int = 0
    alerts: list[dict[str, Any]] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)

    @property
    def flagged(self) -> list[Score]:
        return [s for s in self.scores if s.flagged]

    def as_dict(self) -> dict[str, Any]:
        return {
            "log": self.log, "records": self.records, "checked": len(self.scores), "flagged": len(self.flagged),
            "sample_rate": self.sample_rate, "sample_seed": self.sample_seed, "alerts": self.alerts,
            "scores": [s.as_dict() for s in self.scores],
        }


def sampled(key: bytes, rec: RequestRecord, rate: float) -> bool:
    """Whether this record is in the sample: a keyed hash, unpredictable to the inside."""
    if rate >= 1.0:
        return True
    h = hmac.new(key, f"{rec.seq}:{rec.id}".encode(), hashlib.sha256).digest()
    return int.from_bytes(h[:8], "big") < int(rate * (1 << 64))


def score_record(model: Any, rec: RequestRecord, th: Thresholds, unseeded: bool = False) -> Score:
    """Teacher-force one logged answer through the strong model and judge it."""
    method = method_for(rec.seed, rec.temperature, rec.top_p, unseeded)
    if not rec.output_ids:
        return Score(rec.seq, rec.id, method, 0, 0, 0.0, None, False, "")
    logits = model.score_fast(rec.prompt_ids, rec.output_ids)
    flips, gap, z, flagged, reason = judge(method, logits, rec.output_ids, rec.seed, rec.temperature, rec.top_p, th)
    return Score(rec.seq, rec.id, method, len(rec.output_ids), flips, gap, z, flagged, reason)


def verify_records(model: Any, records: Iterable[RequestRecord | AlertRecord], config: VerifyConfig, log_name: str = "",
                   on_score: Callable[[Score], None] | None = None) -> VerifyReport:
    """Score the sampled requests of `records` (alerts are collected, not scored)."""
    config.validate()
    seed = config.sample_seed if config.sample_seed is not None else secrets.randbits(63)
    key = seed.to_bytes(8, "big")
    report = VerifyReport(log_name, config.sample_rate, seed)
    for rec in records:
        if isinstance(rec, AlertRecord):
            report.alerts.append({"seq": rec.seq, "ts": rec.ts, "kind": rec.kind, **rec.detail})
            continue
        if not isinstance(rec, RequestRecord):  # a connection record: bytes for the reconciliation, no answer
            continue
        report.records += 1
        if not sampled(key, rec, config.sample_rate):
            continue
        s = score_record(model, rec, config.thresholds, config.unseeded)
        report.scores.append(s)
        if on_score is not None:
            on_score(s)
    return report


def verify_log(path: str | Path, model: Any, config: VerifyConfig, progress: bool = False,
               public_key: Any = None) -> VerifyReport:
    """Read the whole log strictly (LogCorrupt on any bad line), then score a sample of it.

    The log is read to the end before anything is scored, so a corrupt or truncated log is an
    error even where the bad line falls outside the sample."""
    records = list(read_log(path, public_key))
    if not any(isinstance(r, RequestRecord) for r in records):
        raise LogCorrupt(f"request log {path} holds no answers; there is nothing to verify")
    if not progress:
        return verify_records(model, records, config, str(path))
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    n = sum(isinstance(r, RequestRecord) for r in records)
    with Progress(TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("verify", total=n)
        done = 0

        def gen() -> Iterable[RequestRecord | AlertRecord]:
            nonlocal done
            for r in records:
                yield r
                if isinstance(r, RequestRecord):
                    done += 1
                    bar.update(task, completed=done)

        return verify_records(model, gen(), config, str(path))
