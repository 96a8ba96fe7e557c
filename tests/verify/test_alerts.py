"""Anomaly alerts: bits per token against the running distribution, burn rate, webhook, metrics."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from exfilguard.errors import ConfigError
from exfilguard.verify.alerts import AlertConfig, AnomalyMonitor, webhook_sender

HONEST = [2.0, 2.2, 1.8, 2.5, 1.9, 2.1, 2.3, 1.7, 2.4, 2.0] * 3


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def monitor(**kw) -> AnomalyMonitor:
    return AnomalyMonitor(AlertConfig(min_history=10, **kw), clock=Clock())


def test_no_alert_before_the_baseline_exists() -> None:
    m = monitor()
    for _ in range(9):
        assert m.observe_answer("x", 64, 64 * 30 // 8) is None  # 30 bits/token, but no baseline yet


def test_bits_per_token_outlier_is_flagged_and_kept_out_of_the_baseline() -> None:
    m = monitor()
    for i, b in enumerate(HONEST):
        assert m.observe_answer(f"h{i}", 64, int(b * 64 / 8)) is None
    base = m.baseline()
    a = m.observe_answer("fake", 64, 64 * 16 // 8)  # made-up tokens: 16 bits each
    assert a is not None and a.kind == "bits_per_token" and a.detail["id"] == "fake"
    assert m.baseline() == base  # the attack did not move the baseline
    # ... so the same attack again is flagged again
    assert m.observe_answer("fake2", 64, 64 * 16 // 8) is not None
    assert m.observe_answer("honest", 64, 17) is None
    assert m.observe_answer("short", 3, 100) is None  # below min_tokens: overhead, not scored


def test_burn_rate_alerts_once_per_episode_and_throttles() -> None:
    clock = Clock()
    m = AnomalyMonitor(AlertConfig(lifetime_s=1000.0, burn_window_s=100.0, throttle=True), clock=clock)
    got = []
    m.on_alert.append(got.append)
    used = 0
    for _ in range(50):  # 1 byte/s against a plan of 10_000 bytes over 1000 s
        clock.t += 10
        used += 10
        m.observe_budget(used, 10_000)
    assert not got and not m.throttled
    for _ in range(5):  # 200 bytes/s: the rest (9500) would be gone in < 50 s of 500 left
        clock.t += 10
        used += 2000 if used + 2000 < 10_000 else 0
        m.observe_budget(used, 10_000)
    assert [a.kind for a in got] == ["burn_rate"]
    assert m.throttled
    for _ in range(30):  # quiet again: the window forgets the burst
        clock.t += 10
        m.observe_budget(used, 10_000)
    assert not m.throttled and len(got) == 1
    text = m.metrics.render().decode()
    assert 'exfilguard_outside_alerts_total{kind="burn_rate"} 1.0' in text
    assert "exfilguard_outside_throttled 0.0" in text


def test_no_throttle_unless_asked() -> None:
    clock = Clock()
    m = AnomalyMonitor(AlertConfig(lifetime_s=100.0, burn_window_s=10.0), clock=clock)
    m.observe_budget(0, 1000)
    clock.t += 1
    assert m.observe_budget(900, 1000) is not None
    assert m.burning and not m.throttled


@pytest.mark.parametrize("kw", [dict(z=0), dict(min_history=1), dict(lifetime_s=-1), dict(burn_window_s=0)])
def test_bad_alert_config_is_refused(kw) -> None:
    with pytest.raises(ConfigError):
        AnomalyMonitor(AlertConfig(**kw))


def test_webhook_receives_the_alert() -> None:
    got: list[dict] = []
    done = threading.Event()

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            n = int(self.headers["Content-Length"])
            got.append(json.loads(self.rfile.read(n)))
            self.send_response(204)
            self.end_headers()
            done.set()

        def log_message(self, *a) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        m = monitor()
        m.on_alert.append(webhook_sender(f"http://127.0.0.1:{srv.server_address[1]}/hook"))
        for b in HONEST:
            m.observe_answer("h", 64, int(b * 8))
        m.observe_answer("fake", 64, 128)
        assert done.wait(10)
        assert got[0]["alert"] == "bits_per_token" and got[0]["id"] == "fake"
    finally:
        srv.shutdown()


def test_baselines_are_per_temperature() -> None:
    m = monitor()
    for i, b in enumerate(HONEST):
        assert m.observe_answer(f"h{i}", 64, int(b * 64 / 8), temperature=0.7) is None
    # T = 1 answers cost more bits honestly: no alert until T = 1 has a baseline of its own ...
    for i in range(10):
        assert m.observe_answer(f"t{i}", 64, int(5.0 * 64 / 8), temperature=1.0) is None
    # ... and then T = 1 is judged against T = 1, T = 0.7 against T = 0.7.
    assert m.observe_answer("t1", 64, int(5.2 * 64 / 8), temperature=1.0) is None
    assert m.observe_answer("t07", 64, int(5.2 * 64 / 8), temperature=0.7) is not None


def test_burn_metrics_are_minus_one_when_idle_and_count_forwarded_bytes_without_a_lifetime() -> None:
    m = monitor()  # no --budget-lifetime: no alert, but the figures are still there for Prometheus
    text = m.metrics.render().decode()
    assert "exfilguard_outside_projected_exhaustion_seconds -1.0" in text  # nothing observed: not burning
    m.observe_budget(100, 10_000)
    m.clock.t += 100
    assert m.observe_budget(100, 10_000) is None
    text = m.metrics.render().decode()
    assert "exfilguard_outside_burn_rate_bytes_per_second 0.0" in text
    assert "exfilguard_outside_projected_exhaustion_seconds -1.0" in text  # idle: -1, as the help says
    m.clock.t += 100
    m.observe_budget(2100, 10_000, left_bytes=7900)
    text = m.metrics.render().decode()
    assert "exfilguard_outside_burn_rate_bytes_per_second 10.0" in text  # 2000 B over the 200 s window
    assert "exfilguard_outside_burn_window_seconds 200.0" in text
    assert "exfilguard_outside_projected_exhaustion_seconds 790.0" in text
    assert "exfilguard_outside_budget_forwarded_bytes 2100.0" in text


def test_audit_feeds_forwarded_bytes_not_reservations() -> None:
    """A meter that reserved a 4 KiB block for 100 forwarded bytes burns 100, not 4096."""
    from exfilguard.outside.audit import Audit, AuditConfig

    a = Audit(AuditConfig(alerts=AlertConfig(min_history=10)))
    a.monitor.clock = Clock()
    st = {"cap_bytes": 100_000, "reserved_bytes": 4096, "remaining_bytes": 95_904, "cap_remaining_bytes": 95_904,
          "unforwarded_reserved_bytes": 3996, "state": "ok"}
    a.observe_meter_status(st)
    text = a.monitor.metrics.render().decode()
    assert "exfilguard_outside_budget_forwarded_bytes 100.0" in text
    assert "exfilguard_outside_budget_left_bytes 99900.0" in text
