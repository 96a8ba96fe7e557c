"""Capacity planning: size a lifetime egress cap from the model's size and its expected traffic.

The argument (Greenblatt 2024, "tokens versus parameters"): over its lifetime a model emits
T x D tokens at b bits each, i.e. T x D x b / 8 bytes, while its weights are N x B bytes. When
the lifetime's tokens are not many times the parameter count and b is small, the whole
lifetime's legitimate output fits under a cap smaller than the weights, and an attacker who owns
the inference servers cannot move the weights out through the cap, however they encode them.
Every formula is written out in docs/plan.md and the README's worked example.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from exfilguard.errors import ConfigError, LedgerTampered

SECONDS_PER_DAY = 86_400.0
# The outside's decode rate, tokens per second per CPU core, with 32 concurrent streams (the
# default weak model and codec on a 2-core CPU; README "Serving", bench/serve_bench.py --decode-rate).
DEFAULT_DECODE_RATE = 250.0

# Suffixes for counts (parameters, tokens): decimal, as model sizes are quoted ("70B", "1T").
_COUNT_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str | float | int, what: str) -> float:
    """Parse a positive count such as 135M, 70B, 1T, 1e12 or 5000000; raise ConfigError otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]?)\s*", str(text))
        if not m or m.group(2).lower() not in _COUNT_UNITS:
            raise ConfigError(f"{what} {text!r} is not a count (examples: 135M, 70B, 1T, 1e12)")
        value = float(m.group(1)) * _COUNT_UNITS[m.group(2).lower()]
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} {text!r} must be a positive, finite number")
    return value


@dataclass(frozen=True)
class PlanInput:
    """What the operator expects: model size, traffic, coding efficiency, lifetime."""

    params: float  # N, number of parameters
    bytes_per_param: float  # B, e.g. 2 for bf16, 0.5 for int4
    tokens_per_day: float  # T, generated tokens served per day
    bits_per_token: float  # b, bits that cross the meter per generated token
    lifetime_days: float  # D, days the model will be served
    headroom: float = 0.25  # H, extra fraction of the expected lifetime egress the cap allows
    attacker_compression: float = 100.0  # C, how many-fold an attacker shrinks the weights (16-100x reported)
    cap_bytes: float | None = None  # a cap the operator has in mind, to check
    decode_rate: float = DEFAULT_DECODE_RATE  # R, tokens/s the outside decodes per CPU core

    def validate(self) -> None:
        """Raise ConfigError naming the first value that cannot make a plan."""
        positive = {
            "--params": self.params,
            "--bytes-per-param": self.bytes_per_param,
            "--tokens-per-day": self.tokens_per_day,
            "--bits-per-token": self.bits_per_token,
            "--lifetime-days": self.lifetime_days,
        }
        for name, v in positive.items():
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} {v!r} must be a positive, finite number")
        if not math.isfinite(self.headroom) or self.headroom < 0:
            raise ConfigError(f"--headroom {self.headroom!r} must be a fraction >= 0 (0.25 = 25% above the expected egress)")
        if not math.isfinite(self.attacker_compression) or self.attacker_compression < 1:
            raise ConfigError(f"--attacker-compression {self.attacker_compression!r} must be >= 1 (1 = no compression)")
        if not isinstance(self.decode_rate, (int, float)) or not math.isfinite(self.decode_rate) or self.decode_rate <= 0:
            raise ConfigError(f"--decode-rate {self.decode_rate!r} must be a positive number of tokens per second per core")
        if self.cap_bytes is not None and (not math.isfinite(self.cap_bytes) or self.cap_bytes <= 0):
            raise ConfigError(f"--cap {self.cap_bytes!r} must be a positive number of bytes")


@dataclass(frozen=True)
class Plan:
    """The planner's figures; the first six fields are the JSON keys the issue fixes."""

    weight_bytes: float
    egress_bytes_per_day: float
    lifetime_egress_bytes: float
    recommended_cap_bytes: float
    days_to_exfiltrate: float
    days_to_exfiltrate_compressed: float
    # The tokens-versus-parameters view and what keeps the weights safe.
    lifetime_tokens: float
    tokens_per_param: float
    egress_to_weight_ratio: float
    cap_per_day_bytes: float
    compressed_weight_bytes: float
    weights_safe: bool
    weights_safe_compressed: bool
    max_bits_per_token_safe: float
    # With a chosen cap (--cap): the bits per token it needs, and whether it keeps the weights safe.
    chosen_cap_bytes: float | None = None
    chosen_cap_bits_per_token: float | None = None
    chosen_cap_safe: bool | None = None
    # The outside decodes every token with the weak model: the CPU cores that takes on average,
    # T / 86,400 / R (peaks need more; the inside's encoding rides on the strong model's servers).
    outside_cores: float = 0.0
    decode_rate: float = DEFAULT_DECODE_RATE

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(p: PlanInput) -> Plan:
    """Compute every planner figure from the inputs (formulas in docs/plan.md)."""
    p.validate()
    weight = p.params * p.bytes_per_param  # W = N x B
    per_day = p.tokens_per_day * p.bits_per_token / 8.0  # E = T x b / 8
    lifetime = per_day * p.lifetime_days  # L = E x D
    cap = lifetime * (1.0 + p.headroom)  # cap = L x (1 + H)
    # The cap spread evenly over the lifetime (a 1-day window of cap / D): the fastest an attacker
    # who has taken over all egress can move bytes without tripping the window.
    cap_per_day = cap / p.lifetime_days
    compressed = weight / p.attacker_compression
    tokens = p.tokens_per_day * p.lifetime_days
    # The largest bits per token whose lifetime egress, with headroom, still fits under the
    # compressed weight size, so that the whole cap cannot carry even the compressed weights.
    max_bits_safe = 8.0 * compressed / (tokens * (1.0 + p.headroom))
    chosen_bits = chosen_safe = None
    if p.cap_bytes is not None:
        chosen_bits = 8.0 * p.cap_bytes / (tokens * (1.0 + p.headroom))
        chosen_safe = p.cap_bytes < compressed
    return Plan(
        weight_bytes=weight,
        egress_bytes_per_day=per_day,
        lifetime_egress_bytes=lifetime,
        recommended_cap_bytes=cap,
        days_to_exfiltrate=weight / cap_per_day,
        days_to_exfiltrate_compressed=compressed / cap_per_day,
        lifetime_tokens=tokens,
        tokens_per_param=tokens / p.params,
        egress_to_weight_ratio=lifetime / weight,
        cap_per_day_bytes=cap_per_day,
        compressed_weight_bytes=compressed,
        weights_safe=cap < weight,
        weights_safe_compressed=cap < compressed,
        max_bits_per_token_safe=max_bits_safe,
        chosen_cap_bytes=p.cap_bytes,
        chosen_cap_bits_per_token=chosen_bits,
        chosen_cap_safe=chosen_safe,
        outside_cores=p.tokens_per_day / SECONDS_PER_DAY / p.decode_rate,
        decode_rate=p.decode_rate,
    )


@dataclass(frozen=True)
class Measured:
    """What a running deployment's ledger says it spends, and the bits per token that implies."""

    ledger: str
    budget: str
    used_bytes: int
    outstanding_bytes: int  # reserved ahead by the meter, not yet settled: counted as used
    since_us: int  # when the budget was created (ledger time)
    until_us: int  # the later of now and the ledger's last entry
    span_days: float
    bytes_per_day: float
    tokens: float | None  # tokens served over the same span, when the operator gives them
    tokens_source: str  # "given" (--measured-tokens) or "planned" (--tokens-per-day x span)
    bits_per_token: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(ledger_url: str, tokens_per_day: float, tokens: float | None = None, budget: str | None = None,
            now_us: int | None = None) -> Measured:
    """Read bytes used and the budget's age from the ledger; derive the bits per token spent.

    The ledger counts bytes, never tokens. With `tokens` (tokens served over the budget's life,
    e.g. the sum of the outside API's usage.completion_tokens) the result is measured; without
    it the planned tokens per day over the same span stand in, and ``tokens_source`` says so.
    """
    import time

    from exfilguard.ledger import open_ledger, reads
    from exfilguard.ledger.events import decode_event

    led = open_ledger(ledger_url, create=False)
    try:
        st = reads.status(led, budget)
        since = None
        last_ts = 0
        for seq, entry in reads.entries(led):
            try:
                ev = decode_event(entry)
            except ValueError as exc:
                raise LedgerTampered(f"ledger entry {seq} is malformed ({exc}); run `exfilguard ledger verify`") from None
            last_ts = ev["ts"]
            if since is None and ev["kind"] == "budget_created" and ev.get("budget") == st.budget:
                since = int(ev["ts"])
    finally:
        led.close()
    if since is None:
        raise ConfigError(f"ledger {ledger_url} has no budget_created event for budget {st.budget!r}")
    until = max(int(time.time() * 1_000_000) if now_us is None else now_us, last_ts)
    span_days = (until - since) / 1e6 / SECONDS_PER_DAY
    if span_days <= 0:
        raise ConfigError(f"budget {st.budget!r} in {ledger_url} is too new to measure a rate")
    per_day = st.used_bytes / span_days
    if tokens is not None:
        if not math.isfinite(tokens) or tokens <= 0:
            raise ConfigError(f"--measured-tokens {tokens!r} must be a positive number")
        served, source = tokens, "given"
    else:
        served, source = tokens_per_day * span_days, "planned"
    return Measured(
        ledger=ledger_url,
        budget=st.budget,
        used_bytes=st.used_bytes,
        outstanding_bytes=st.outstanding_bytes,
        since_us=since,
        until_us=until,
        span_days=span_days,
        bytes_per_day=per_day,
        tokens=tokens,
        tokens_source=source,
        bits_per_token=8.0 * st.used_bytes / served,
    )


def plot_plan(p: PlanInput, plan: Plan, path: str, measured_plan: Plan | None = None, measured_bits: float | None = None) -> None:
    """Draw cumulative legitimate egress over the lifetime against the cap and the weight size."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    days = [p.lifetime_days * i / 200 for i in range(201)]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(days, [plan.egress_bytes_per_day * d for d in days], label=f"legitimate egress at {p.bits_per_token:g} bits/token")
    if measured_plan is not None and measured_bits is not None:
        ax.plot(days, [measured_plan.egress_bytes_per_day * d for d in days], linestyle="-.",
                label=f"legitimate egress at measured {measured_bits:.3g} bits/token")
    ax.axhline(plan.recommended_cap_bytes, color="tab:red", label=f"recommended cap (headroom {p.headroom:g})")
    ax.axhline(plan.weight_bytes, color="black", label="weight size")
    ax.axhline(plan.compressed_weight_bytes, color="black", linestyle="--",
               label=f"weights compressed {p.attacker_compression:g}x")
    if p.cap_bytes is not None:
        ax.axhline(p.cap_bytes, color="tab:purple", linestyle=":", label="chosen cap")
    ax.set_yscale("log")
    ax.set_xlim(0, p.lifetime_days)
    ax.set_xlabel("days in service")
    ax.set_ylabel("bytes")
    ax.set_title("Cumulative egress against the cap and the weights")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as exc:
        raise ConfigError(f"cannot write the plot to {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
