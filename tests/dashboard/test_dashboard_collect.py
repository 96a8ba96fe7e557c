"""The dashboard's figures against a real SQLite ledger with known events, and its bad inputs."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from exfilguard.dashboard import Collector, DashboardConfig, create_dashboard_app
from exfilguard.dashboard.collect import _BudgetSeries, burn_rate, exhaustion, parse_prometheus
from exfilguard.errors import ConfigError
from exfilguard.ledger import load_private_key, open_ledger
from exfilguard.ledger import reads
from exfilguard.ledger.keytools import generate_keypair, load_public_key
from exfilguard.ledger.keys import sign_tree_head
from exfilguard.meter.metrics import MeterMetrics

EXFILGUARD = [sys.executable, "-m", "exfilguard.cli.main"]


def poll_verified(c: Collector) -> dict:
    """Poll, let the verification it started finish, poll again: the snapshot then carries its result."""
    c.poll()
    c.join_verify(60)
    return c.poll()


def test_burn_rate_and_exhaustion_by_hand() -> None:
    s = _BudgetSeries(created_us=0)
    s.add(0, 4096)  # reserved ahead: not burnt
    s.add_forwarded(10_000_000, 1000)  # 1000 B forwarded at t = 10 s
    s.add_forwarded(20_000_000, 2000)  # 3000 B by t = 20 s
    # Over the whole life (window longer than the budget's age): 3000 B / 30 s.
    rate, span = burn_rate(s, 3000, 30_000_000, 3600)
    assert (rate, span) == (100.0, 30.0)
    # Over the last 15 s (from t = 15 s, when 1000 B were used): 2000 B / 15 s.
    rate, span = burn_rate(s, 3000, 30_000_000, 15)
    assert span == 15 and rate == pytest.approx(2000 / 15)
    assert exhaustion(7000, 100.0, 30.0) == 100.0  # 7000 B left at 100 B/s: 70 s after t = 30 s
    assert exhaustion(7000, 0.0, 30.0) is None  # never at this rate
    assert exhaustion(0, 0.0, 30.0) == 30.0  # already spent


def test_series_keeps_one_point_a_second() -> None:
    s = _BudgetSeries()
    s.add(1_000_000, 1)
    s.add(1_500_000, 2)  # same second: replaces
    s.add(2_000_000, 3)
    assert s.points == [(1_500_000, 2), (2_000_000, 3)]
    assert s.used_at(1_999_999) == 2 and s.used_at(0) == 0 and s.used_at(5_000_000) == 3


def test_parse_the_real_meters_metrics() -> None:
    m = MeterMetrics()
    m.denials.labels(reason="cap").inc(3)
    m.denials.labels(reason="window").inc()
    m.bytes_out.inc(12345)
    parsed = parse_prometheus(m.render().decode())
    assert {lab["reason"]: v for lab, v in parsed["exfilguard_meter_denials_total"]} == {"cap": 3.0, "window": 1.0}
    assert parsed["exfilguard_meter_bytes_out_total"][0][1] == 12345.0
    with pytest.raises(ValueError):
        parse_prometheus("this is { not prometheus\n")


def _ledger(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    led = open_ledger(url)
    try:
        led.ensure_budget("alpha", 10_000)
        led.ensure_budget("beta", 500)
        g = led.reserve("alpha", 4000, "m1", 1)
        led.release(g.res, 2500, "m1")  # alpha: 2500 used
        led.reserve("beta", 500, "m1", 2)  # beta: spent
        led.reserve("beta", 10, "m1", 3)  # denied: cap
    finally:
        led.close()
    return url


def test_collector_matches_ledger_status(tmp_path: Path) -> None:
    url = _ledger(tmp_path)
    c = Collector(DashboardConfig(ledger_url=url))
    try:
        snap = poll_verified(c)
    finally:
        c.close()
    assert snap["ok"] and snap["error"] is None
    led = open_ledger(url, create=False)
    try:
        want = {n: reads.status(led, n).as_dict() for n in ("alpha", "beta")}
    finally:
        led.close()
    got = {b["budget"]: b for b in snap["budgets"]}
    for name in want:
        for k, v in want[name].items():
            assert got[name][k] == v, (name, k)
    assert got["alpha"]["used_bytes"] == 2500 and got["beta"]["remaining_bytes"] == 0
    assert got["beta"]["ledger_denials"] == {"cap": 1} and got["alpha"]["ledger_denials"] == {}
    assert got["beta"]["exhaustion_ts"] == snap["now"]  # spent: exhausted now
    assert got["alpha"]["burn_bytes_per_second"] > 0
    assert got["alpha"]["used_series"][-1][1] == 2500
    assert snap["verify"]["state"] == "ok" and snap["tree_head"] is None
    assert snap["meter"] is None and "not tokens" in snap["bits_per_token"]["error"]


def test_collector_reads_new_events_and_signed_heads(tmp_path: Path) -> None:
    url = _ledger(tmp_path)
    key, pub = generate_keypair(tmp_path / "k")
    c = Collector(DashboardConfig(ledger_url=url, public_keys=[pub], verify_every=0.001))
    try:
        first = poll_verified(c)
        c.join_verify(60)  # the second poll may have started another run; it must not straddle the change
        led = open_ledger(url, create=False)
        try:
            led.reserve("alpha", 1000, "m1", 4)
            head = reads.tree_head(led)
            led.add_tree_head(sign_tree_head(load_private_key(key), head.tree_size, head.ts, head.root))
        finally:
            led.close()
        time.sleep(0.01)
        second = poll_verified(c)
    finally:
        c.close()
    a1 = next(b for b in first["budgets"] if b["budget"] == "alpha")
    a2 = next(b for b in second["budgets"] if b["budget"] == "alpha")
    assert a2["used_bytes"] == a1["used_bytes"] + 1000 and a2["tree_size"] == a1["tree_size"] + 1
    assert second["tree_head"]["tree_size"] == a2["tree_size"] and second["tree_head"]["root"] == a2["root"]
    assert second["verify"]["state"] == "ok" and second["verify"]["signed_heads"] == 1


def test_collector_reports_a_tampered_ledger(tmp_path: Path) -> None:
    url = _ledger(tmp_path)
    con = sqlite3.connect(tmp_path / "l.db")
    con.execute("UPDATE budgets SET reserved_bytes = 0 WHERE name = 'alpha'")
    con.commit()
    con.close()
    c = Collector(DashboardConfig(ledger_url=url))
    try:
        snap = poll_verified(c)
    finally:
        c.close()
    assert snap["verify"]["state"] == "failed"
    assert any("row changed" in p for p in snap["verify"]["problems"])


def test_collector_says_when_the_meter_metrics_are_unreachable(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    c = Collector(DashboardConfig(ledger_url=_ledger(tmp_path), meter_metrics_url=f"http://127.0.0.1:{port}/metrics",
                                  tokens_metrics_url=f"http://127.0.0.1:{port}/metrics"))
    try:
        snap = c.poll()
    finally:
        c.close()
    assert snap["ok"]  # the ledger view still works
    assert snap["meter"]["error"] and snap["bits_per_token"]["error"]
    assert snap["bits_per_token"]["source_bytes"].startswith("ledger forwarded bytes")


def test_app_is_read_only_and_serves_state(tmp_path: Path) -> None:
    app = create_dashboard_app(_ledger(tmp_path), refresh_seconds=0.2)
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200 and "<svg" in page.text
        # No asset from elsewhere: the page must work without internet.
        assert "http://" not in page.text.replace("http://www.w3.org/2000/svg", "") and "https://" not in page.text
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not client.get("/api/state").json().get("ok"):
            time.sleep(0.05)
        state = client.get("/api/state").json()
        assert state["ok"] and {b["budget"] for b in state["budgets"]} == {"alpha", "beta"}
        for method in ("post", "put", "delete"):
            assert getattr(client, method)("/api/state").status_code == 405


@pytest.mark.parametrize("kwargs,needle", [
    ({"ledger_url": "not a url"}, "not a URL"),
    ({"ledger_url": "sqlite:////nonexistent-dir-17/l.db"}, "no ledger at"),
    ({"ledger_url": "mysql://x/y"}, "unknown ledger URL scheme"),
    ({"meter_metrics_url": "ftp://x/metrics"}, "--meter-metrics"),
    ({"tokens_metrics_url": "localhost:9/metrics"}, "--tokens-metrics"),
    ({"listen": "nowhere"}, "--listen"),
    ({"refresh_seconds": 0}, "--refresh"),
    ({"public_keys": [Path("/nonexistent-dir-17/k.pub")]}, "cannot read public key"),
])
def test_bad_config_is_refused(kwargs: dict, needle: str, tmp_path: Path) -> None:
    cfg = {"ledger_url": _ledger(tmp_path), **kwargs}
    with pytest.raises(ConfigError, match=needle.replace("-", r"\-")):
        Collector(DashboardConfig(**cfg))


@pytest.mark.parametrize("args,needle", [
    (["--ledger", "sqlite:////nonexistent-dir-17/l.db"], "no ledger at"),
    (["--listen", "127.0.0.1:notaport"], "--listen"),
    (["--meter-metrics", "127.0.0.1:9/metrics"], "--meter-metrics"),
])
def test_cli_bad_input_is_one_clear_line(args: list[str], needle: str, tmp_path: Path) -> None:
    base = {"--ledger": _ledger(tmp_path), "--listen": "127.0.0.1:0"}
    base.update(dict(zip(args[::2], args[1::2])))
    r = subprocess.run([*EXFILGUARD, "dashboard", *[x for kv in base.items() for x in kv]],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == ConfigError.exit_code
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


def test_cli_refuses_a_taken_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = subprocess.run([*EXFILGUARD, "dashboard", "--ledger", _ledger(tmp_path), "--listen",
                            f"127.0.0.1:{s.getsockname()[1]}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == ConfigError.exit_code
    assert "cannot listen" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_signed_heads_without_a_public_key_are_unchecked_not_ok(tmp_path: Path) -> None:
    url = _ledger(tmp_path)
    key, _pub = generate_keypair(tmp_path / "k")
    led = open_ledger(url, create=False)
    try:
        head = reads.tree_head(led)
        led.add_tree_head(sign_tree_head(load_private_key(key), head.tree_size, head.ts, head.root))
    finally:
        led.close()
    c = Collector(DashboardConfig(ledger_url=url))
    try:
        snap = poll_verified(c)
    finally:
        c.close()
    v = snap["verify"]
    assert v["state"] == "signatures unchecked"
    assert any("--public-key" in n for n in v["notes"])


@pytest.mark.postgres
def test_collector_on_postgresql(pg_url: str) -> None:
    led = open_ledger(pg_url)
    try:
        led.ensure_budget("shared", 5000)
        g = led.reserve("shared", 3000, "m1", 1)
        led.release(g.res, 1200, "m1")
        led.reserve("shared", 4000, "m2", 2)  # only 3800 fit
        want = reads.status(led, "shared").as_dict()
    finally:
        led.close()
    c = Collector(DashboardConfig(ledger_url=pg_url))
    try:
        snap = poll_verified(c)
    finally:
        c.close()
    (b,) = snap["budgets"]
    for k, v in want.items():
        assert b[k] == v, k
    assert b["used_bytes"] == 5000 and b["remaining_bytes"] == 0
    assert snap["verify"]["state"] == "ok"


def test_exhaustion_projection_respects_the_windows(tmp_path: Path) -> None:
    from exfilguard.ledger import Window

    url = f"sqlite:///{tmp_path / 'w.db'}"
    led = open_ledger(url)
    try:
        led.ensure_budget("w", 1_000_000, [Window(3600, 36_000)])  # at most 10 B/s on average
        g = led.reserve("w", 36_000, "m", 1)  # a burst that spends the hour's window at once
        led.release(g.res, 36_000, "m")
    finally:
        led.close()
    c = Collector(DashboardConfig(ledger_url=url))
    try:
        snap = c.poll()
    finally:
        c.close()
    (b,) = snap["budgets"]
    assert b["burn_bytes_per_second"] > 10  # the burst, over the budget's short life
    assert b["window_ceiling_bytes_per_second"] == 10
    # 964,000 B left at no more than 10 B/s: at least 96,400 s, not the burst's few seconds.
    assert b["exhaustion_ts"] - snap["now"] == pytest.approx(96_400, rel=1e-6)


@pytest.mark.parametrize("garbage", [b"not json", b"[1, 2]", b'{"budget": "alpha", "kind": "reserve", "ts": "later"}'])
def test_a_malformed_entry_keeps_the_page_up_and_fails_verification(tmp_path: Path, garbage: bytes) -> None:
    url = _ledger(tmp_path)
    con = sqlite3.connect(tmp_path / "l.db")
    con.execute("UPDATE events SET entry = ? WHERE seq = 2", (garbage,))
    con.commit()
    con.close()
    c = Collector(DashboardConfig(ledger_url=url))
    try:
        snap = poll_verified(c)
    finally:
        c.close()
    assert snap["ok"] and {b["budget"] for b in snap["budgets"]} == {"alpha", "beta"}
    assert snap["verify"]["state"] == "failed" and "malformed" in " ".join(snap["verify"]["problems"])


def test_app_mounted_under_a_path_polls_and_points_the_page_at_its_api(tmp_path: Path) -> None:
    """`exfilguard up` may mount the app (a mount runs no lifespan): requests start the polling."""
    from fastapi import FastAPI

    parent = FastAPI()
    parent.mount("/dashboard", create_dashboard_app(_ledger(tmp_path), refresh_seconds=0.2))
    with TestClient(parent) as client:
        page = client.get("/dashboard/")
        assert page.status_code == 200 and 'const API_URL = "/dashboard/api/state";' in page.text
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not client.get("/dashboard/api/state").json().get("ok"):
            time.sleep(0.05)
        assert {b["budget"] for b in client.get("/dashboard/api/state").json()["budgets"]} == {"alpha", "beta"}


def _sign(url: str, key: Path) -> None:
    led = open_ledger(url, create=False)
    try:
        head = reads.tree_head(led)
        led.add_tree_head(sign_tree_head(load_private_key(key), head.tree_size, head.ts, head.root))
    finally:
        led.close()


def _reserve(url: str, n: int) -> None:
    led = open_ledger(url, create=False)
    try:
        for i in range(n):
            g = led.reserve("alpha", 10, "m1", 10 + i)
            led.release(g.res, 10, "m1")
    finally:
        led.close()


def test_entries_not_yet_signed_are_freshness_not_tampering(tmp_path: Path) -> None:
    url = _ledger(tmp_path)
    key, pub = generate_keypair(tmp_path / "k")
    _sign(url, key)
    _reserve(url, 2)  # 4 entries after the last head: a running meter signs them at its next head
    c = Collector(DashboardConfig(ledger_url=url, public_keys=[pub], sth_interval_seconds=30))
    try:
        v = poll_verified(c)["verify"]
    finally:
        c.close()
    assert v["state"] == "not yet signed" and v["problems"] == [], v
    assert v["freshness"]["entries"] == 4 and 0 <= v["freshness"]["next_head_in_s"] <= 30
    assert v["freshness"]["text"].startswith("4 entries not yet signed (next head in ")


def test_rollback_to_a_signed_head_is_red_within_one_poll(tmp_path: Path) -> None:
    """A consistent rollback (events, budgets and heads together, cut exactly at an earlier signed
    head) verifies on its own; the page remembers the later head it saw and says so at the next poll."""
    url = _ledger(tmp_path)
    key, pub = generate_keypair(tmp_path / "k")
    _sign(url, key)
    earlier = sqlite3.connect(":memory:")
    live = sqlite3.connect(tmp_path / "l.db")
    live.backup(earlier)  # the whole ledger as it was at the first head
    _reserve(url, 3)
    _sign(url, key)
    c = Collector(DashboardConfig(ledger_url=url, public_keys=[pub], verify_every=3600))
    try:
        before = poll_verified(c)["verify"]
        assert before["state"] == "ok", before
        earlier.backup(live)  # roll the ledger back to the first head, as a whole
        snap = c.poll()  # one poll, no full verification in between
        v = snap["verify"]
        assert v["state"] == "rolled back" and "shorter than a signed head" in v["problems"][0], v
        led = open_ledger(url, create=False)
        try:
            from exfilguard.ledger.verify import verify_ledger

            assert verify_ledger(led, [load_public_key(pub)]).ok  # on its own the rolled-back ledger verifies
        finally:
            led.close()
    finally:
        c.close()
        live.close()


def test_bits_per_token_series_holds_between_requests(tmp_path: Path) -> None:
    """Samples where nothing moved (no request) add no point: the chart never drops to 0 between answers."""
    c = Collector(DashboardConfig(ledger_url=_ledger(tmp_path), tokens_metrics_url="http://127.0.0.1:1/metrics"))
    feed = iter([(0, 50), (100, 100), (100, 100), (100, 100), (100, 150), (300, 180), (300, 180)])
    c._tokens = lambda: (lambda t, b: (float(t), float(b), None))(*next(feed))  # type: ignore[method-assign]
    try:
        for _ in range(7):
            snap = c.poll()
    finally:
        c.close()
    series = [round(v, 3) for _, v in snap["bits_per_token"]["series"]]
    # (0,50)->(100,100): 8*50/100 = 4; bytes without tokens wait for their tokens: (100,100)->(300,180) = 8*80/200
    assert series == [4.0, 3.2]
