"""The dashboard in a real headless Chromium, against a live meter and a real SQLite ledger.

The page's numbers are read from the rendered text and checked against `exfilguard ledger
status --json`; then traffic goes through the meter and the page must follow it.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "meter"))
from dashkit import (  # noqa: E402
    Proc,
    free_port,
    http_get,
    ledger_status,
    read_budget,
    start_browser,
    stop_browser,
    text_of,
    wait_for,
)
from meterkit import MeterProcess, Upstream, pull  # noqa: E402

from exfilguard.ledger.keytools import generate_keypair  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(600)]
KEY = "sk-dashboard-test"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    d = start_browser()
    yield d
    stop_browser(d)


def page_agrees_with_ledger(driver: Any, url: str) -> dict[str, Any]:
    """Wait until the page shows the ledger's current tree size; then its figures must be the ledger's."""

    def same_size() -> tuple[dict[str, Any], dict[str, Any]] | None:
        st = ledger_status(url)
        page = read_budget(driver)
        return (page, st) if page["tree_size"] == st["tree_size"] else None

    page, st = wait_for(same_size, 60, "the page to show the ledger's tree size")
    for k in ("cap_bytes", "forwarded_bytes", "remaining_bytes", "outstanding_bytes"):
        assert page[k] == st[k], (k, page, st)
    return page


def prom(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in http_get(url).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = out.get(name, 0.0) + float(value)
    return out


def test_page_follows_real_traffic_through_the_whole_stack(browser: Any, tmp_path: Path) -> None:
    """inside (tiny-random) -> real meter -> outside API, all real processes; the page tracks bytes and tokens."""
    key, pub = generate_keypair(tmp_path / "meter.key")
    ledger = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    (tmp_path / "keys").write_text(KEY + "\n")
    procs: list[Any] = []
    try:
        iport, mport, mmport, oport = free_port(), free_port(), free_port(), free_port()
        # inside and outside load their models at the same time; the meter joins them once the inside listens.
        inside = Proc(tmp_path, "inside", "inside", "--strong", "tiny-random", "--weak", "tiny-random",
                      "--listen", f"127.0.0.1:{iport}")
        procs.append(inside)
        outside = Proc(tmp_path, "outside", "outside", "--inside", f"127.0.0.1:{mport}", "--weak", "tiny-random",
                       "--listen", f"127.0.0.1:{oport}", "--api-keys", str(tmp_path / "keys"),
                       "--meter-status", f"http://127.0.0.1:{mmport}/status", "--model-name", "tiny-random")
        procs.append(outside)
        inside.wait_port(iport, 240)
        # Small reservation blocks, so that a few short answers move the ledger's used bytes.
        meter = Proc(tmp_path, "meter", "meter", "--listen", f"127.0.0.1:{mport}", "--upstream", f"127.0.0.1:{iport}",
                     "--ledger", ledger, "--cap", str(10**7), "--reserve-block", "256", "--metrics", f"127.0.0.1:{mmport}",
                     "--signing-key", str(key), "--sth-interval", "0.5")
        procs.append(meter)
        meter.wait_http(f"http://127.0.0.1:{mmport}/status", 60)
        outside.wait_http(f"http://127.0.0.1:{oport}/health", 240)
        dport = free_port()
        dash = Proc(tmp_path, "dashboard", "dashboard", "--ledger", ledger,
                    "--meter-metrics", f"http://127.0.0.1:{mmport}/metrics",
                    "--tokens-metrics", f"http://127.0.0.1:{oport}/metrics",
                    "--public-key", str(pub), "--listen", f"127.0.0.1:{dport}", "--refresh", "0.5", "--verify-every", "1")
        procs.append(dash)
        dash.wait_http(f"http://127.0.0.1:{dport}/api/state", 60)

        browser.get(f"http://127.0.0.1:{dport}/")
        before = page_agrees_with_ledger(browser, ledger)
        assert before["cap_bytes"] == 10**7
        wait_for(lambda: text_of(browser, "#verify-state") == "ok", 60, "ledger verification ok on the page")
        wait_for(lambda: text_of(browser, '[data-field="sth_key"]'), 60, "a signed tree head on the page")
        assert text_of(browser, '[data-field="meter_state"]') == "ok"

        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{oport}/v1", api_key=KEY, max_retries=0, timeout=120)
        served = 0
        for i in range(4):
            r = client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": f"count to {i}"}],
                                               max_tokens=24, temperature=0.7, seed=i)
            served += r.usage.completion_tokens
        assert served > 0

        def moved() -> dict[str, Any] | None:
            page = read_budget(browser)
            latest = text_of(browser, "#bpt-latest")
            return page if page["forwarded_bytes"] > before["forwarded_bytes"] and "bits/token" in latest else None

        wait_for(moved, 60, "the page's forwarded bytes and bits per token to follow the traffic")
        after = page_agrees_with_ledger(browser, ledger)
        assert after["forwarded_bytes"] > before["forwarded_bytes"]
        assert after["remaining_bytes"] < before["remaining_bytes"]
        assert after["tree_size"] > before["tree_size"]
        assert "0 B/s" != after["burn_rate"]

        # Bits per token since start is 8 x the meter's forwarded bytes (its whole life, the
        # outside's connection set-up included) over the tokens the outside decoded.
        m = prom(f"http://127.0.0.1:{mmport}/metrics")
        o = prom(f"http://127.0.0.1:{oport}/metrics")
        tokens = o["exfilguard_outside_tokens_total"]
        assert tokens >= served
        want = 8 * m["exfilguard_meter_bytes_out_total"] / tokens
        assert math.isfinite(want) and want > 0

        def overall_matches() -> bool:
            shown = text_of(browser, "#bpt-overall")
            return shown.endswith("bits/token") and float(shown.split()[0]) == pytest.approx(want, abs=0.0015)

        wait_for(overall_matches, 30, f"bits per token since start to read {want:.3f}")
        assert int(text_of(browser, "#bpt-tokens").replace(",", "")) == int(tokens)
        # The chart has a line with at least one interval.
        pts = browser.execute_script(
            "return document.querySelector('#bpt-chart polyline[data-series=\"bits-per-token\"]').getAttribute('points')")
        assert pts and len(pts.split()) >= 1
    finally:
        for p in reversed(procs):
            p.stop()


def test_page_shows_exhaustion_denials_and_tampering(browser: Any, tmp_path: Path) -> None:
    """A flooding upstream spends the cap; the page shows it spent, the denials, and a tampered ledger."""
    key, pub = generate_keypair(tmp_path / "meter.key")
    db = tmp_path / "ledger.sqlite"
    ledger = f"sqlite:///{db}"
    up = Upstream("flood")
    procs: list[Any] = []
    try:
        meter = MeterProcess(tmp_path, ledger, up.addr, 100_000, "--signing-key", str(key), "--sth-interval", "0.5",
                             block=16384)
        procs.append(meter)
        meter.wait_ready()
        dport = free_port()
        dash = Proc(tmp_path, "dashboard", "dashboard", "--ledger", ledger,
                    "--meter-metrics", f"http://127.0.0.1:{meter.metrics_port}/metrics",
                    "--public-key", str(pub), "--listen", f"127.0.0.1:{dport}", "--refresh", "0.5", "--verify-every", "1")
        procs.append(dash)
        dash.wait_http(f"http://127.0.0.1:{dport}/api/state", 60)
        browser.get(f"http://127.0.0.1:{dport}/")
        before = page_agrees_with_ledger(browser, ledger)
        assert before["forwarded_bytes"] == 0 and before["remaining_bytes"] == 100_000
        assert read_budget(browser)["exhaustion"] == "never at this rate"
        # No token counter given: the page says why there is no bits-per-token line.
        assert "not tokens" in text_of(browser, "#bpt-note")

        got = asyncio.run(pull("127.0.0.1", meter.port, 30))
        assert got == 100_000
        asyncio.run(pull("127.0.0.1", meter.port, 30))  # refused: the budget is spent
        wait_for(lambda: read_budget(browser)["remaining_bytes"] == 0, 60, "the page to show the budget spent")
        spent = page_agrees_with_ledger(browser, ledger)
        assert spent["forwarded_bytes"] == 100_000 and spent["exhaustion"] == "exhausted"
        wait_for(lambda: int(text_of(browser, '[data-field="meter_denials"]').replace(",", "")) >= 1, 30,
                 "the meter's denials on the page")
        assert text_of(browser, '[data-field="meter_state"]') == "exhausted"
        assert "cap" in read_budget(browser)["ledger_denials"]
        wait_for(lambda: text_of(browser, "#verify-state") == "ok", 30, "verification ok before tampering")
        # The ledger's signed head on the page is the one stored last.
        sth = wait_for(lambda: text_of(browser, '[data-field="sth_root"]'), 30, "a signed tree head")
        stored = sqlite3.connect(db).execute("SELECT root FROM tree_heads ORDER BY ts DESC, tree_size DESC LIMIT 1").fetchone()
        assert len(sth) == 64
        # (a newer head may have been signed since the page read it: the page's root is one that was signed)
        roots = {r[0].hex() for r in sqlite3.connect(db).execute("SELECT root FROM tree_heads")}
        assert sth in roots and stored is not None

        # Tamper: an attacker "refunds" the budget row. Verification on the page must turn red.
        meter.stop()
        procs.remove(meter)
        con = sqlite3.connect(db)
        con.execute("UPDATE budgets SET reserved_bytes = 0")
        con.commit()
        con.close()
        wait_for(lambda: text_of(browser, "#verify-state") == "failed", 60, "verification failed on the page")
        assert "row changed" in text_of(browser, "#verify-detail")
        state = json.loads(http_get(f"http://127.0.0.1:{dport}/api/state"))
        assert state["verify"]["state"] == "failed"
        # The meter is gone: the page says its metrics are unavailable rather than showing stale ones.
        wait_for(lambda: "unavailable" in text_of(browser, "#meter-body"), 30, "meter metrics unavailable on the page")
    finally:
        for p in reversed(procs):
            p.stop()
        up.close()
