"""What the dashboard shows, gathered read-only from the ledger, the meter's metrics and a token counter.

One `Collector` owns one ledger connection and is polled from one thread; `snapshot()` returns
a JSON-ready dict. Nothing here writes to the ledger.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exfilguard.errors import ConfigError, ExfilguardError
from exfilguard.ledger import reads

log = logging.getLogger(__name__)

# Counter of tokens that crossed the meter, as the outside API exposes it (its /metrics).
TOKENS_METRIC = "exfilguard_outside_tokens_total"
# Bytes the outside received through the meter, on the same page as the token counter: both read in one scrape.
OUTSIDE_BYTES_METRIC = "exfilguard_outside_bytes_in_total"
METER_BYTES_OUT = "exfilguard_meter_bytes_out_total"
METER_DENIALS = "exfilguard_meter_denials_total"


@dataclass
class DashboardConfig:
    """Where the dashboard reads from and how often."""

    ledger_url: str
    meter_metrics_url: str | None = None
    tokens_metrics_url: str | None = None
    public_keys: Sequence[Path] = ()
    listen: str = "127.0.0.1:8050"
    refresh_seconds: float = 3.0  # how often the page and the collector poll
    verify_every: float = 30.0  # full verify_ledger runs (it rereads the whole log)
    burn_window_seconds: float = 3600.0  # burn rate: bytes forwarded per second over this trailing window
    sth_interval_seconds: float = 30.0  # the meter's --sth-interval: entries newer than this are simply not signed yet
    history_points: int = 720  # bits-per-token samples kept (at 3 s: the last 36 minutes)

    def validate(self) -> None:
        """Raise ConfigError naming the first value that cannot work."""
        from exfilguard.meter.config import parse_hostport

        parse_hostport(self.listen, "--listen")
        for name, url in (("--meter-metrics", self.meter_metrics_url), ("--tokens-metrics", self.tokens_metrics_url)):
            if url is not None and not url.startswith(("http://", "https://")):
                raise ConfigError(f"{name} {url!r} is not an http(s) URL (example: http://127.0.0.1:9100/metrics)")
        for what, v in (("--refresh", self.refresh_seconds), ("--verify-every", self.verify_every),
                        ("burn window", self.burn_window_seconds)):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{what} {v!r} must be a positive number of seconds")
        if self.history_points < 2:
            raise ConfigError("history_points must be at least 2")


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Parse Prometheus text exposition into sample name -> [(labels, value)]; ValueError if malformed."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def fetch_metrics(url: str, timeout: float = 2.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """GET a Prometheus endpoint and parse it; raise OSError/ValueError on failure."""
    import httpx

    r = httpx.get(url, timeout=timeout)
    r.raise_for_status()
    return parse_prometheus(r.text)


@dataclass
class _BudgetSeries:
    created_us: int | None = None
    # (ts in µs, bytes reserved after the event), at most one point per second: the last one wins.
    points: list[tuple[int, int]] = field(default_factory=list)
    # (ts in µs, bytes forwarded so far: the sum of settled reservations' used bytes), likewise.
    forwarded: list[tuple[int, int]] = field(default_factory=list)
    denials: dict[str, int] = field(default_factory=dict)

    def add(self, ts: int, used: int) -> None:
        _add(self.points, ts, used)

    def add_forwarded(self, ts: int, nbytes: int) -> None:
        _add(self.forwarded, ts, (self.forwarded[-1][1] if self.forwarded else 0) + nbytes)

    def used_at(self, ts: int) -> int:
        """Bytes reserved at time ts (0 before the first event)."""
        return _at(self.points, ts)

    def forwarded_at(self, ts: int) -> int:
        """Bytes forwarded (settled) at time ts (0 before the first settlement)."""
        return _at(self.forwarded, ts)


def _add(points: list[tuple[int, int]], ts: int, v: int) -> None:
    if points and points[-1][0] // 1_000_000 == ts // 1_000_000:
        points[-1] = (ts, v)
    else:
        points.append((ts, v))


def _at(points: list[tuple[int, int]], ts: int) -> int:
    import bisect

    i = bisect.bisect_right(points, (ts, math.inf))
    return points[i - 1][1] if i else 0


def _is_unsigned_tail(problem: str) -> bool:
    """verify_ledger's finding that the newest entries are not under a signed head (or none is)."""
    return ("entries are not covered by a signed tree head" in problem
            or problem.startswith("no signed tree heads, but a public key was given"))


def burn_rate(series: _BudgetSeries, forwarded_now: int, now_us: int, window_s: float) -> tuple[float, float]:
    """Return (bytes forwarded per second over the trailing window, seconds the rate is taken over).

    Forwarded, not reserved: reservations come in blocks ahead of the bytes (4 KiB for a 100-byte
    answer), so a rate of reservations overstates the burn by the block size over the window."""
    start = now_us - int(window_s * 1_000_000)
    if series.created_us is not None:
        start = max(start, series.created_us)
    span = (now_us - start) / 1e6
    if span <= 0:
        return 0.0, 0.0
    return max(0, forwarded_now - series.forwarded_at(start)) / span, span


def exhaustion(remaining: int, rate: float, now_s: float) -> float | None:
    """Unix time when `remaining` bytes run out at `rate` bytes per second (None: never)."""
    if remaining <= 0:
        return now_s
    if rate <= 0:
        return None
    return now_s + remaining / rate


class Collector:
    """Polls the ledger (incrementally), the meter's metrics and a token counter; keeps history."""

    def __init__(self, config: DashboardConfig):
        from exfilguard.ledger import open_ledger
        from exfilguard.ledger.keytools import load_public_key

        config.validate()
        self.config = config
        self._keys = [load_public_key(p) for p in config.public_keys]
        # Opened now, so that a wrong URL or a missing file is a startup error, not a red page.
        self._ledger = open_ledger(config.ledger_url, create=False)
        self._url = self._ledger.url  # PostgreSQL URLs come back with the password redacted
        self._next_seq = 0
        self._series: dict[str, _BudgetSeries] = {}
        self._samples: deque[dict[str, Any]] = deque(maxlen=config.history_points)
        self._verify: dict[str, Any] = {"state": "pending", "checked_at": None}
        self._last_verify = -math.inf
        self._verifier: threading.Thread | None = None
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {"ok": False, "error": "not polled yet"}
        # The largest signed head this page has seen (signature checked when it has a key): the
        # ledger must never again be shorter than it, or hold another root at its size. This is
        # what tells a rollback to an earlier signed head (which verify_ledger alone cannot see)
        # from entries that are simply not signed yet.
        self._seen_head: Any = None
        self._rollback: str | None = None

    # -- the ledger ----------------------------------------------------------------------
    def _check_rollback(self, now_s: float) -> None:
        """Remember the largest valid signed head; flag a ledger that no longer extends it (every poll, cheap)."""
        from exfilguard.ledger.keys import key_id
        from exfilguard.ledger.keytools import verify_tree_head

        keys = {key_id(k): k for k in self._keys}
        heads = reads.tree_heads(self._ledger)
        if self._seen_head is not None and not any(h.tree_size >= self._seen_head.tree_size for h in heads):
            self._rollback = (f"the signed head of {self._seen_head.tree_size} entries this page saw is gone from the "
                              "ledger (heads deleted or the ledger rolled back)")
        for h in heads:
            if self._seen_head is not None and h.tree_size <= self._seen_head.tree_size:
                continue
            k = keys.get(h.key_id)
            if self._keys and (k is None or not verify_tree_head(k, h)):
                continue  # a head nobody vouches for must not become the yardstick (verify reports it)
            self._seen_head = h
        cur = reads.tree_head(self._ledger)
        seen = self._seen_head
        if seen is None:
            return
        if cur.tree_size < seen.tree_size:
            self._rollback = (f"the log is shorter than a signed head: {cur.tree_size} entries, but a head signed at "
                              f"{time.strftime('%H:%M:%S', time.gmtime(seen.ts / 1e6))} UTC covered {seen.tree_size} "
                              "(entries deleted or the ledger rolled back)")
        elif cur.tree_size == seen.tree_size and cur.root != seen.root:
            self._rollback = (f"the log's root at {cur.tree_size} entries is not the signed head's of that size "
                              "(the log was rewritten)")
        if cur.tree_size < self._next_seq:  # read again from the start what is there now
            self._next_seq = 0
            self._series.clear()

    def _read_new_events(self) -> None:
        import json

        for seq, entry in reads.entries(self._ledger, self._next_seq):
            # Plain JSON, not decode_event's canonical-form check: integrity is verify_ledger's job
            # (on its own thread), and this keeps the first read of a big log twice as fast.
            self._next_seq = seq + 1
            try:
                self._add_event(json.loads(entry))
            except (ValueError, TypeError, KeyError, AttributeError):
                pass  # a malformed entry: verify_ledger reports it; the page keeps going

    def _add_event(self, ev: dict[str, Any]) -> None:
        if "budget" not in ev:
            return
        s = self._series.setdefault(str(ev["budget"]), _BudgetSeries())
        kind, ts = ev["kind"], int(ev["ts"])
        if kind == "budget_created":
            s.created_us = ts
            s.add(ts, 0)
        elif kind in ("reserve", "release") and isinstance(ev.get("reserved"), int):
            s.add(ts, ev["reserved"])
            if kind == "release" and isinstance(ev.get("used"), int):
                s.add_forwarded(ts, ev["used"])
        elif kind == "deny":
            reason = str(ev.get("reason") or "cap").split(":")[0]
            s.denials[reason] = s.denials.get(reason, 0) + 1

    def _budgets(self, now_s: float) -> list[dict[str, Any]]:
        now_us = int(now_s * 1_000_000)
        out = []
        for name in reads.budgets(self._ledger):
            st = reads.status(self._ledger, name).as_dict()
            s = self._series.setdefault(name, _BudgetSeries())
            rate, span = burn_rate(s, st["forwarded_bytes"], now_us, self.config.burn_window_seconds)
            # The windows bound how fast the cap can go, whatever the recent burst did.
            ceiling = min((w["limit_bytes"] / w["seconds"] for w in st["windows"]), default=math.inf)
            # Nothing more can be reserved: spent now. Else what can still leave (the cap minus what
            # left: reserved bytes not yet used can still be forwarded) at the forwarded rate.
            left = st["cap_bytes"] - st["forwarded_bytes"] if st["remaining_bytes"] > 0 else 0
            ex = exhaustion(left, min(rate, ceiling), now_s)
            pts = s.points[-300:]
            fwd = s.forwarded[-300:]
            out.append({
                **st,
                "burn_bytes_per_second": rate,
                "burn_window_seconds": span,
                "window_ceiling_bytes_per_second": None if math.isinf(ceiling) else ceiling,
                "exhaustion_ts": ex,
                "created_ts": None if s.created_us is None else s.created_us / 1e6,
                "ledger_denials": dict(s.denials),
                "used_series": [[t / 1e6, u] for t, u in pts],
                "forwarded_series": [[t / 1e6, u] for t, u in fwd],
            })
        return out

    def _tree_head(self) -> dict[str, Any] | None:
        heads = reads.tree_heads(self._ledger)
        if not heads:
            return None
        h = heads[-1]
        return {"tree_size": h.tree_size, "ts": h.ts / 1e6, "root": h.root.hex(), "key_id": h.key_id,
                "signature": h.signature.hex(), "count": len(heads)}

    def _run_verify(self, now_s: float) -> None:
        """Start a full audit (verify_ledger) every verify_every seconds, on a thread and connection of its own.

        It rereads the whole log (seconds on a large ledger), so the figures keep refreshing meanwhile.
        """
        if self._verifier is not None and self._verifier.is_alive():
            return
        if now_s - self._last_verify < self.config.verify_every:
            return
        self._last_verify = now_s
        self._verifier = threading.Thread(target=self._verify_once, args=(now_s,), name="dashboard-verify", daemon=True)
        self._verifier.start()

    def join_verify(self, timeout: float | None = None) -> None:
        """Wait for a running verification to finish (its result shows in the next poll)."""
        if self._verifier is not None:
            self._verifier.join(timeout)

    def _verify_once(self, now_s: float) -> None:
        from exfilguard.ledger import open_ledger
        from exfilguard.ledger.verify import verify_ledger

        seen = self._seen_head
        try:
            led = open_ledger(self.config.ledger_url, create=False)
            try:
                # The largest head this page saw is a trusted head: the ledger must extend it.
                rep = verify_ledger(led, self._keys, [seen] if seen is not None else [],
                                    sth_interval=self.config.sth_interval_seconds)
            finally:
                led.close()
        except ExfilguardError as exc:
            self._verify = {"state": "unavailable", "checked_at": now_s, "problems": [str(exc)], "notes": []}
            return
        except Exception as exc:  # a bug must show on the page, not leave an old "ok" standing
            log.exception("ledger verification failed to run")
            self._verify = {"state": "error", "checked_at": now_s, "problems": [f"{type(exc).__name__}: {exc}"], "notes": []}
            return
        notes = list(rep.notes)
        if not self._keys:
            notes.append("no --public-key given: signatures of tree heads cannot be checked")
        # Entries after the last signed head are the normal state of a running meter (it signs every
        # --sth-interval): that is freshness, not tampering. Only the tail problem is set aside.
        tail = [p for p in rep.problems if _is_unsigned_tail(p)]
        problems = [p for p in rep.problems if not _is_unsigned_tail(p)]
        fresh = None
        if tail or rep.pending_entries:  # pending: verify_ledger's own freshness verdict (not a problem)
            fresh = self._freshness(rep.unsigned_tail, now_s)
        if problems:
            state = "failed"
        elif rep.unchecked_heads:
            # Heads are signed but we were given no key to check them with: not a tamper finding.
            state = "signatures unchecked"
        elif fresh is not None:
            state = "overdue" if fresh["overdue"] else "not yet signed"
        else:
            state = "ok"
        self._verify = {
            "state": state, "checked_at": now_s, "tree_size": rep.tree_size, "root": rep.root,
            "signed_heads": rep.signed_heads, "unsigned_tail": rep.unsigned_tail, "freshness": fresh,
            "problems": problems[:20], "problem_count": len(problems), "notes": notes,
        }

    def _freshness(self, unsigned: int, now_s: float) -> dict[str, Any]:
        """How far the unsigned tail is from the meter's next head."""
        interval = self.config.sth_interval_seconds
        head = self._seen_head
        since = head.ts / 1e6 if head is not None else None
        next_in = None if since is None else since + interval - now_s
        overdue = next_in is not None and next_in < -2 * interval  # two heads missed: is the meter signing?
        if next_in is None:
            text = f"{unsigned} entries not yet signed (no signed head yet; the meter signs every {interval:g} s)"
        elif overdue:
            text = (f"{unsigned} entries not signed for {now_s - since:.0f} s (the meter signs every {interval:g} s: "
                    "is it running?)")
        else:
            text = f"{unsigned} entries not yet signed (next head in {max(0.0, next_in):.0f} s)"
        return {"entries": unsigned, "next_head_in_s": None if next_in is None else max(0.0, next_in),
                "overdue": overdue, "text": text}

    # -- the meter and the token counter ------------------------------------------------
    def _meter(self) -> dict[str, Any] | None:
        url = self.config.meter_metrics_url
        if url is None:
            return None
        try:
            m = fetch_metrics(url)
        except Exception as exc:  # the page says so; the ledger view keeps working
            return {"url": url, "error": f"{type(exc).__name__}: {exc}"}
        denials = {lab.get("reason", ""): v for lab, v in m.get(METER_DENIALS, [])}
        alerts = [
            {"name": name, "labels": lab, "value": v}
            for name, samples in sorted(m.items()) if "alert" in name and not name.endswith("_created")
            for lab, v in samples
        ]
        state = next((lab.get("state") for lab, v in m.get("exfilguard_meter_state", []) if v == 1), None)
        up = m.get("exfilguard_meter_ledger_up", [({}, math.nan)])[0][1]
        return {
            "url": url, "error": None, "state": state, "ledger_up": None if math.isnan(up) else bool(up),
            "bytes_out": sum(v for _, v in m.get(METER_BYTES_OUT, [])), "denials": denials, "alerts": alerts,
        }

    def _tokens(self) -> tuple[float | None, float | None, str | None]:
        """(tokens decoded, bytes the outside received, error) from the outside's /metrics, one scrape."""
        url = self.config.tokens_metrics_url
        if url is None:
            return None, None, None
        try:
            m = fetch_metrics(url)
        except Exception as exc:
            return None, None, f"{type(exc).__name__}: {exc}"
        if TOKENS_METRIC not in m:
            return None, None, f"{url} has no {TOKENS_METRIC} counter"
        nbytes = sum(v for _, v in m[OUTSIDE_BYTES_METRIC]) if OUTSIDE_BYTES_METRIC in m else None
        return sum(v for _, v in m[TOKENS_METRIC]), nbytes, None

    def _bits_per_token(self, now_s: float, budgets: list[dict[str, Any]], meter: dict[str, Any] | None) -> dict[str, Any]:
        tokens, outside_bytes, terr = self._tokens()
        # Bytes that actually crossed, read in the same scrape as the tokens when the outside has
        # them (the meter's counter is read a moment apart: an interval could get a token's bytes
        # without the token, or the reverse); else the meter's counter; else the ledger's forwarded.
        if outside_bytes is not None:
            nbytes, source = outside_bytes, "outside bytes received through the meter"
        elif meter is not None and not meter.get("error"):
            nbytes, source = meter["bytes_out"], "meter bytes_out"
        else:
            nbytes, source = float(sum(b["forwarded_bytes"] for b in budgets)), "ledger forwarded bytes (settled)"
        if tokens is not None:
            self._samples.append({"t": now_s, "bytes": nbytes, "tokens": tokens})
        series = []
        anchor = None
        for s in self._samples:
            if anchor is None or s["tokens"] < anchor["tokens"] or s["bytes"] < anchor["bytes"]:
                anchor = s  # the first sample, or a counter went down (its process restarted): start again
                continue
            # A point only when both moved: between requests nothing moves, and the chart holds
            # its last value instead of dropping to 0 (or spiking on bytes without their tokens).
            if s["tokens"] > anchor["tokens"] and s["bytes"] > anchor["bytes"]:
                series.append([s["t"], 8.0 * (s["bytes"] - anchor["bytes"]) / (s["tokens"] - anchor["tokens"])])
                anchor = s
        # Since the meter and the outside started: their counters' whole life (every byte that
        # crossed, the outside's connection set-up included), not since this page started.
        overall = None
        if self._samples and self._samples[-1]["tokens"] > 0:
            last = self._samples[-1]
            overall = 8.0 * last["bytes"] / last["tokens"]
        if self.config.tokens_metrics_url is None:
            why = "no token counter given (--tokens-metrics): the ledger and the meter count bytes, not tokens"
        else:
            why = terr
        return {"source_bytes": source, "tokens_url": self.config.tokens_metrics_url, "tokens_total": tokens,
                "error": why, "series": series, "since_start": overall}

    # -- polling -------------------------------------------------------------------------
    def poll(self) -> dict[str, Any]:
        """Read everything once; store and return the snapshot the page shows."""
        now_s = time.time()
        try:
            self._check_rollback(now_s)
            self._read_new_events()
            budgets = self._budgets(now_s)
            head = self._tree_head()
            snap: dict[str, Any] = {"ok": True, "error": None}
        except ExfilguardError as exc:
            prev = self._snapshot
            budgets, head = prev.get("budgets", []), prev.get("tree_head")
            snap = {"ok": False, "error": str(exc)}
        self._run_verify(now_s)
        meter = self._meter()
        verify = self._verify
        if self._rollback is not None:  # seen this poll, not at the next full verification
            verify = {**verify, "state": "rolled back",
                      "problems": [self._rollback] + [p for p in verify.get("problems", []) if p != self._rollback]}
        snap.update({
            "now": now_s, "ledger": self._url, "budgets": budgets, "tree_head": head, "verify": verify,
            "meter": meter, "bits_per_token": self._bits_per_token(now_s, budgets, meter),
            "refresh_seconds": self.config.refresh_seconds,
        })
        with self._lock:
            self._snapshot = snap
        return snap

    def snapshot(self) -> dict[str, Any]:
        """The last polled state (thread-safe)."""
        with self._lock:
            return self._snapshot

    def close(self) -> None:
        self.join_verify(60)
        self._ledger.close()
