"""Prometheus metrics of one meter, in a registry of its own (no global state)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric


class _LoopCounter:
    """A counter bumped only from the event loop thread: a plain int, no lock per chunk forwarded."""

    def __init__(self, name: str, doc: str):
        self.name, self.doc, self.value = name, doc, 0

    def inc(self, n: int = 1) -> None:
        self.value += n


class _LoopCounters:
    """Exposes _LoopCounters at scrape time (a collector of the registry)."""

    def __init__(self, *counters: _LoopCounter):
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        for c in self.counters:
            yield CounterMetricFamily(c.name, c.doc, value=c.value)


class MeterMetrics:
    """The meter's counters and gauges; ``render()`` gives the text exposition format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "exfilguard_meter_"
        self.bytes_out = _LoopCounter(p + "bytes_out", "Bytes forwarded from upstream (inside) to clients, metered")
        self.bytes_in = _LoopCounter(p + "bytes_in", "Bytes forwarded from clients to upstream, counted not capped")
        self.timing_charged = _LoopCounter(
            p + "timing_charged_bytes", "Bytes counted in the ledger for timing (connection open/close, short reads), besides bytes_out")
        r.register(_LoopCounters(self.bytes_out, self.bytes_in, self.timing_charged))
        self.reserved = Gauge(p + "reserved_bytes", "Bytes the ledger holds reserved against the cap (last seen)", registry=r)
        self.remaining = Gauge(p + "remaining_bytes", "Bytes left for new answers: what the budget can still grant (cap and windows, from the replayed log)", registry=r)
        self.denials = Counter(p + "denials", "Connections refused or cut", ["reason"], registry=r)
        self.open_connections = Gauge(p + "open_connections", "Client connections open", registry=r)
        self.commit_seconds = Histogram(
            p + "ledger_commit_seconds", "Latency of one ledger commit (a group of reservations)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r,
        )
        self.ledger_up = Gauge(p + "ledger_up", "1 when the ledger can be written, 0 when the meter fails closed", registry=r)
        self.ledger_failures = Counter(p + "ledger_failures", "Times the ledger became unavailable", registry=r)
        self.state = Gauge(p + "state", "1 for the meter's current state", ["state"], registry=r)
        # Forwarded (bytes_out_total), reserved and outstanding, told apart; the budget_* gauges are the
        # whole budget as last read from the ledger (every meter on it), the others this meter's own.
        self.budget_forwarded = Gauge(
            p + "budget_forwarded_bytes", "Bytes settled reservations of the budget say were forwarded (last seen)", registry=r)
        self.budget_outstanding = Gauge(
            p + "budget_outstanding_bytes", "Bytes in the budget's open reservations, all meters (last seen)", registry=r)
        self.outstanding = Gauge(p + "outstanding_bytes", "Bytes in this meter's open reservations", registry=r)
        self.unforwarded = Gauge(
            p + "unforwarded_reserved_bytes",
            "Bytes this meter holds reserved and has not forwarded: what a crash now would over-count", registry=r)
        self.block = Histogram(
            p + "reservation_bytes", "Size of each reservation granted (adaptive block sizing)",
            buckets=tuple(float(4**k * 1024) for k in range(1, 9)), registry=r)
        self.block_wait = Counter(
            p + "block_wait_seconds", "Seconds connections waited for their next reservation to commit (pipelining missed)",
            registry=r)
        self.settlements = Counter(p + "settlements", "Connections that settled what they used", ["reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
