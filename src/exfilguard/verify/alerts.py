"""Anomaly alerts: answers that carry too many bits per token, and a budget burning too fast.

Two signals, both cheap enough to run on every answer:

* bits per token: 8 * (bytes the answer's frames took through the meter) / tokens, compared with
  the running distribution of honest answers at the same temperature (median and MAD of log2,
  so one odd answer cannot drag the baseline). Flagged answers are kept out of the baseline, so an attacker cannot raise
  it by attacking. Made-up tokens cost the weak-model codec 10-20 bits each against ~1-3 for
  honest answers, so they stand out at once.
* burn rate: bytes forwarded per second over a sliding window (--burn-window, or since the
  outside started when that is shorter), from the meter's count of bytes that left (not its
  reservations, which run ahead in blocks). When that
  rate would exhaust the cap before the budget's planned lifetime ends, an alert fires (once per
  episode) and, with throttling on, the outside refuses new answers (429) until it falls back.

Alerts go to callbacks (the request log, a webhook) and to Prometheus metrics in a registry of
this monitor's own. No ML imports: the outside imports this module.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from exfilguard.errors import ConfigError

log = logging.getLogger("exfilguard.alerts")


@dataclass
class AlertConfig:
    """Alert thresholds. Times in seconds."""

    z: float = 4.0  # robust z-score of log2(bits per token) that flags an answer
    min_history: int = 20  # honest answers needed before bits-per-token alerts start
    history: int = 2000  # answers the running distribution remembers
    # Shorter answers are dominated by per-answer overhead: at 8 the alert flagged 3 of 300 honest
    # dev answers (all 18-28 tokens), at 32 none of the 278 it scored (bench/verify_fp.py alerts).
    min_tokens: int = 32
    min_spread: float = 0.1  # floor of the spread (log2 units), so a very regular baseline still tolerates noise
    lifetime_s: float | None = None  # the budget's planned lifetime; None: no burn-rate alert
    burn_window_s: float = 3600.0
    throttle: bool = False
    webhook: str | None = None

    def validate(self) -> None:
        if self.z <= 0 or self.min_history < 2 or self.history < self.min_history or self.min_tokens < 1:
            raise ConfigError("alert thresholds: z > 0, min_history >= 2, history >= min_history, min_tokens >= 1")
        if self.lifetime_s is not None and self.lifetime_s <= 0:
            raise ConfigError("--budget-lifetime must be a positive duration")
        if self.burn_window_s <= 0:
            raise ConfigError("--burn-window must be a positive duration")


@dataclass(frozen=True)
class Alert:
    """One alert."""

    kind: str  # bits_per_token | burn_rate
    ts: float
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"alert": self.kind, "ts": self.ts, **self.detail}


class AlertMetrics:
    """Prometheus metrics of the monitor (text exposition via render())."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "exfilguard_outside_"
        self.bits_per_token = Histogram(p + "answer_bits_per_token", "Bits through the meter per token of an answer", registry=r,
                                        buckets=(0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32))
        self.answers = Counter(p + "answers", "Answers decoded", registry=r)
        self.alerts = Counter(p + "alerts", "Anomaly alerts raised", ["kind"], registry=r)
        self.burn_rate = Gauge(p + "burn_rate_bytes_per_second", "Bytes the meter forwarded per second over the burn window "
                               "(exfilguard_outside_burn_window_seconds)", registry=r)
        self.burn_window = Gauge(p + "burn_window_seconds", "Seconds the burn rate is taken over: --burn-window, or since "
                                 "the first sample when that is shorter", registry=r)
        self.planned_rate = Gauge(p + "planned_rate_bytes_per_second", "Rate that would use the rest of the budget exactly "
                                  "at the end of its lifetime (-1: no --budget-lifetime)", registry=r)
        self.exhaustion = Gauge(p + "projected_exhaustion_seconds", "Seconds until the budget is spent at the current burn rate (-1: not burning)", registry=r)
        self.forwarded = Gauge(p + "budget_forwarded_bytes", "Bytes the meter's budget has forwarded (left through the meter), as last read", registry=r)
        self.left = Gauge(p + "budget_left_bytes", "Bytes the meter's budget can still forward (cap and windows), as last read", registry=r)
        # Before the first sample nothing is burning: -1, as the help says (0 would read as "spent now").
        self.exhaustion.set(-1)
        self.planned_rate.set(-1)
        self.forwarded.set(-1)
        self.left.set(-1)
        self.throttled = Gauge(p + "throttled", "1 while the outside refuses new answers because the budget burns too fast", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class AnomalyMonitor:
    """Scores answers and budget samples; calls every `on_alert` callback for each alert."""

    def __init__(self, config: AlertConfig | None = None, prior: list[float] | None = None,
                 clock: Callable[[], float] = time.time):
        self.config = cfg = config or AlertConfig()
        cfg.validate()
        self.metrics = AlertMetrics()
        self.clock = clock
        self.on_alert: list[Callable[[Alert], None]] = []
        self.alerts: list[Alert] = []
        self._lock = threading.Lock()
        # One running distribution per temperature (rounded to 0.1): an answer's cost depends on
        # it (T = 1 costs more bits than T = 0.7), and a pooled baseline flagged 7 of 150 honest
        # answers when traffic moved from T = 0.7 to T = 1 (bench/verify_fp.py alerts). A
        # temperature is only scored once it has min_history answers of its own.
        self._hist: dict[float | None, deque[float]] = {}
        if prior:
            self._hist[None] = deque((math.log2(max(x, 1e-6)) for x in prior), maxlen=cfg.history)
        self._samples: deque[tuple[float, int]] = deque()
        self._start: float | None = None
        self.burning = False

    # -- bits per token ------------------------------------------------------------------
    def baseline(self, temperature: float | None = None) -> tuple[float, float] | None:
        """(median, spread) of log2 bits per token at this temperature, or None before it has
        min_history answers."""
        hist = self._hist.get(_bucket(temperature))
        if hist is None or len(hist) < self.config.min_history:
            return None
        h = list(hist)
        med = statistics.median(h)
        mad = statistics.median(abs(x - med) for x in h)
        return med, max(1.4826 * mad, self.config.min_spread)

    def observe_answer(self, rid: str, tokens: int, wire_bytes: int, temperature: float | None = None) -> Alert | None:
        """Score one answer; an Alert when its bits per token is far above the running distribution."""
        self.metrics.answers.inc()
        if tokens <= 0:
            return None
        bpt = 8.0 * wire_bytes / tokens
        self.metrics.bits_per_token.observe(bpt)
        if tokens < self.config.min_tokens:
            return None
        x = math.log2(max(bpt, 1e-6))
        with self._lock:
            base = self.baseline(temperature)
            z = None if base is None else (x - base[0]) / base[1]
            if z is None or z <= self.config.z:
                key = _bucket(temperature)
                if key not in self._hist:
                    self._hist[key] = deque(maxlen=self.config.history)
                self._hist[key].append(x)
                return None
        return self._raise("bits_per_token", {"id": rid, "tokens": tokens, "wire_bytes": wire_bytes, "temperature": temperature,
                                              "bits_per_token": round(bpt, 3), "baseline_bits_per_token": round(2 ** base[0], 3),
                                              "z": round(z, 2)})

    # -- burn rate -----------------------------------------------------------------------
    def observe_budget(self, used_bytes: int, cap_bytes: int, now: float | None = None,
                       left_bytes: int | None = None) -> Alert | None:
        """Add a sample of the budget: `used_bytes` forwarded so far (bytes that left, not reserved),
        `left_bytes` what it can still forward (default cap - used). Sets the burn-rate metrics;
        an Alert when a burn episode starts (only with a planned lifetime)."""
        cfg = self.config
        now = self.clock() if now is None else now
        with self._lock:
            if self._start is None:
                self._start = now
            self._samples.append((now, used_bytes))
            while len(self._samples) > 2 and self._samples[1][0] <= now - cfg.burn_window_s:
                self._samples.popleft()
            t0, u0 = self._samples[0]
            left = max(cap_bytes - used_bytes, 0) if left_bytes is None else max(left_bytes, 0)
            self.metrics.forwarded.set(used_bytes)
            self.metrics.left.set(left)
            if now <= t0:
                return None
            rate = max(used_bytes - u0, 0) / (now - t0)
            self.metrics.burn_rate.set(rate)
            self.metrics.burn_window.set(now - t0)
            self.metrics.exhaustion.set(left / rate if rate > 0 else -1)
            if cfg.lifetime_s is None:
                return None
            life_left = cfg.lifetime_s - (now - self._start)
            self.metrics.planned_rate.set(left / life_left if life_left > 0 else 0.0)
            # Would the budget run out before the planned end, at this rate?
            burning = life_left > 0 and rate > 0 and left / rate < life_left
            started = burning and not self.burning
            self.burning = burning
            self.metrics.throttled.set(1 if (burning and cfg.throttle) else 0)
        if not started:
            return None
        return self._raise("burn_rate", {"forwarded_bytes": used_bytes, "cap_bytes": cap_bytes, "rate_bytes_per_s": round(rate, 3),
                                         "window_s": round(now - t0, 1), "exhausted_in_s": round(left / rate, 1),
                                         "lifetime_left_s": round(life_left, 1)})

    @property
    def throttled(self) -> bool:
        """Whether new answers should be refused now (throttling on and the budget burning)."""
        return self.config.throttle and self.burning

    def _raise(self, kind: str, detail: dict[str, Any]) -> Alert:
        a = Alert(kind, self.clock(), detail)
        self.alerts.append(a)
        self.metrics.alerts.labels(kind=kind).inc()
        log.warning("ALERT %s: %s", kind, json.dumps(detail))
        for cb in list(self.on_alert):
            try:
                cb(a)
            except Exception:  # noqa: BLE001 - one broken sink must not stop the others
                log.exception("alert callback failed")
        return a


def _bucket(temperature: float | None) -> float | None:
    return None if temperature is None else round(float(temperature), 1)


def webhook_sender(url: str, timeout: float = 2.0) -> Callable[[Alert], None]:
    """An on_alert callback that POSTs the alert as JSON to `url` from a background thread."""

    def send(alert: Alert) -> None:
        def post() -> None:
            import httpx

            try:
                httpx.post(url, json=alert.as_dict(), timeout=timeout)
            except Exception as exc:  # noqa: BLE001
                log.error("alert webhook %s failed: %s", url, exc)

        threading.Thread(target=post, name="exfilguard-webhook", daemon=True).start()

    return send
