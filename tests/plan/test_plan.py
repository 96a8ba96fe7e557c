"""The capacity planner against figures computed by hand, its CLI, its plot and its bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exfilguard.errors import ConfigError
from exfilguard.ledger import open_ledger
from exfilguard.ledger import reads
from exfilguard.plan import PlanInput, make_plan, measure, parse_count

EXFILGUARD = [sys.executable, "-m", "exfilguard.cli.main"]
ISSUE_KEYS = ("weight_bytes", "egress_bytes_per_day", "lifetime_egress_bytes", "recommended_cap_bytes",
              "days_to_exfiltrate", "days_to_exfiltrate_compressed")
README_EXAMPLE = ["--params", "1T", "--bytes-per-param", "2", "--tokens-per-day", "10B", "--bits-per-token", "1",
                  "--lifetime-days", "365", "--headroom", "0.25", "--attacker-compression", "16"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXFILGUARD, "plan", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_readme_worked_example_by_hand() -> None:
    # README "Capacity planning": 1T parameters in bf16, 10B tokens a day at 1 bit each, a year.
    p = make_plan(PlanInput(params=1e12, bytes_per_param=2, tokens_per_day=1e10, bits_per_token=1,
                            lifetime_days=365, headroom=0.25, attacker_compression=16))
    assert p.weight_bytes == 2_000_000_000_000  # 1e12 x 2
    assert p.egress_bytes_per_day == 1_250_000_000  # 1e10 x 1 / 8
    assert p.lifetime_egress_bytes == 456_250_000_000  # 1.25e9 x 365
    assert p.recommended_cap_bytes == 570_312_500_000  # 4.5625e11 x 1.25
    assert p.cap_per_day_bytes == 1_562_500_000  # 5.703125e11 / 365
    assert p.days_to_exfiltrate == 1280  # 2e12 / 1.5625e9
    assert p.days_to_exfiltrate_compressed == 80  # 1.25e11 / 1.5625e9
    assert p.tokens_per_param == pytest.approx(3.65)  # 3.65e12 tokens / 1e12 parameters
    assert p.egress_to_weight_ratio == pytest.approx(0.228125)
    assert p.compressed_weight_bytes == 125_000_000_000
    assert p.weights_safe is True and p.weights_safe_compressed is False
    assert p.max_bits_per_token_safe == pytest.approx(8 * 1.25e11 / (3.65e12 * 1.25))  # 0.21918 bits/token


def test_small_model_example_by_hand() -> None:
    # SmolLM2-135M in bf16, 1M tokens a day at 4 bits, 100 days, no headroom, weights compressed 10x.
    p = make_plan(PlanInput(params=135e6, bytes_per_param=2, tokens_per_day=1e6, bits_per_token=4,
                            lifetime_days=100, headroom=0, attacker_compression=10, cap_bytes=27e6))
    assert p.weight_bytes == 270_000_000
    assert p.egress_bytes_per_day == 500_000
    assert p.lifetime_egress_bytes == 50_000_000
    assert p.recommended_cap_bytes == 50_000_000
    assert p.days_to_exfiltrate == 540  # 2.7e8 / 5e5 a day
    assert p.days_to_exfiltrate_compressed == 54  # 2.7e7 / 5e5
    assert p.max_bits_per_token_safe == pytest.approx(2.16)  # 8 x 2.7e7 / 1e8 tokens
    assert p.chosen_cap_bits_per_token == pytest.approx(2.16)
    assert p.chosen_cap_safe is False  # a cap equal to the compressed weights lets them out exactly
    assert make_plan(PlanInput(135e6, 2, 1e6, 4, 100, 0, 10, cap_bytes=26e6)).chosen_cap_safe is True


def test_more_bits_per_token_shortens_the_attackers_time() -> None:
    a = make_plan(PlanInput(70e9, 2, 1e9, 2, 365))
    b = make_plan(PlanInput(70e9, 2, 1e9, 4, 365))
    assert b.recommended_cap_bytes == 2 * a.recommended_cap_bytes
    assert b.days_to_exfiltrate == a.days_to_exfiltrate / 2


def test_outside_cores_by_hand() -> None:
    # Issue 23: at 25 tokens/s per core, 1B tokens a day needs ~460 cores of decoding; at 250, ~46.
    slow = make_plan(PlanInput(70e9, 2, 1e9, 2, 365, decode_rate=25))
    assert slow.outside_cores == pytest.approx(1e9 / 86_400 / 25)  # 462.96
    fast = make_plan(PlanInput(70e9, 2, 1e9, 2, 365, decode_rate=250))
    assert fast.outside_cores == pytest.approx(46.296, rel=1e-4) and fast.decode_rate == 250
    assert fast.recommended_cap_bytes == slow.recommended_cap_bytes  # the cap does not depend on it


def test_cli_decode_rate() -> None:
    r = run_cli(*README_EXAMPLE, "--decode-rate", "500", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["outside_cores"] == pytest.approx(1e10 / 86_400 / 500) and out["inputs"]["decode_rate"] == 500
    table = run_cli(*README_EXAMPLE, "--decode-rate", "500")
    assert table.returncode == 0 and "outside CPU cores to decode" in table.stdout and "231.5" in table.stdout


@pytest.mark.parametrize("text,value", [("135M", 135e6), ("70B", 70e9), ("1T", 1e12), ("1e12", 1e12), ("2.5k", 2500)])
def test_parse_count(text: str, value: float) -> None:
    assert parse_count(text, "--params") == value


@pytest.mark.parametrize("text", ["x", "", "-5", "0", "10Q", "nan", "1e999"])
def test_parse_count_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_count(text, "--params")


@pytest.mark.parametrize("field,value", [("bytes_per_param", 0), ("bits_per_token", -1), ("lifetime_days", 0),
                                         ("headroom", -0.1), ("attacker_compression", 0.5), ("cap_bytes", 0),
                                         ("tokens_per_day", float("inf")), ("decode_rate", 0)])
def test_plan_input_refuses(field: str, value: float) -> None:
    base = dict(params=1e9, bytes_per_param=2, tokens_per_day=1e6, bits_per_token=1, lifetime_days=30)
    with pytest.raises(ConfigError):
        make_plan(PlanInput(**{**base, field: value}))


def test_cli_json_keys_and_plot(tmp_path: Path) -> None:
    png = tmp_path / "plan.png"
    r = run_cli(*README_EXAMPLE, "--cap", "500GB", "--json", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for k in ISSUE_KEYS:
        assert k in out
    assert out["recommended_cap_bytes"] == 570_312_500_000
    assert out["days_to_exfiltrate"] == 1280 and out["days_to_exfiltrate_compressed"] == 80
    assert out["chosen_cap_bits_per_token"] == pytest.approx(8 * 5e11 / (3.65e12 * 1.25))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cli_table() -> None:
    r = run_cli(*README_EXAMPLE)
    assert r.returncode == 0, r.stderr
    assert "570312500000" in r.stdout and "1280" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--params", "lots"], "--params"),
    (["--bits-per-token", "0"], "--bits-per-token"),
    (["--headroom", "-1"], "--headroom"),
    (["--attacker-compression", "0.5"], "--attacker-compression"),
    (["--cap", "much"], "--cap"),
    (["--decode-rate", "-3"], "--decode-rate"),
    (["--measured-tokens", "5M"], "--measured"),
    (["--measured", "sqlite:////nonexistent-dir-17/ledger.db"], "no ledger at"),
    (["--measured", "not a url"], "not a URL"),
])
def test_cli_bad_input_is_one_clear_line(args: list[str], needle: str, tmp_path: Path) -> None:
    base = dict(zip(README_EXAMPLE[::2], README_EXAMPLE[1::2]))
    base.update(dict(zip(args[::2], args[1::2])))
    r = run_cli(*[x for kv in base.items() for x in kv], "--plot", str(tmp_path / "p.png"))
    assert r.returncode == ConfigError.exit_code
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert not (tmp_path / "p.png").exists()  # a refused plan writes nothing


def test_cli_plot_into_a_missing_directory(tmp_path: Path) -> None:
    r = run_cli(*README_EXAMPLE, "--plot", str(tmp_path / "no" / "such" / "dir" / "p.png"))
    assert r.returncode == ConfigError.exit_code
    assert "cannot write the plot" in r.stderr


def _ledger_with_traffic(path: Path) -> tuple[str, int]:
    url = f"sqlite:///{path}"
    led = open_ledger(url)
    try:
        led.ensure_budget("default", 10**9)
        g = led.reserve("default", 4096)
        led.release(g.res, 1000)  # settled at 1000 bytes: 3096 go back
        g2 = led.reserve("default", 500)  # still outstanding: counted as used
        assert g2.granted == 500
    finally:
        led.close()
    return url, 1500


def test_measured_bits_per_token_by_hand(tmp_path: Path) -> None:
    url, used = _ledger_with_traffic(tmp_path / "l.db")
    led = open_ledger(url, create=False)
    created = next(e for e in reads.entries(led))  # the budget_created event
    led.close()
    since = json.loads(created[1])["ts"]
    m = measure(url, tokens_per_day=1e6, tokens=6000, now_us=since + 2 * 86_400_000_000)
    assert m.used_bytes == used and m.outstanding_bytes == 500
    assert m.span_days == pytest.approx(2.0)
    assert m.bytes_per_day == pytest.approx(750.0)  # 1500 B over 2 days
    assert m.bits_per_token == pytest.approx(2.0)  # 8 x 1500 / 6000, exactly as served
    assert m.tokens_source == "given"
    # Without a token count the planned rate stands in, and the result says so.
    m2 = measure(url, tokens_per_day=1000, now_us=since + 2 * 86_400_000_000)
    assert m2.tokens_source == "planned" and m2.tokens is None
    assert m2.bits_per_token == pytest.approx(8 * 1500 / 2000)


def test_cli_measured(tmp_path: Path) -> None:
    url, used = _ledger_with_traffic(tmp_path / "l.db")
    png = tmp_path / "m.png"
    r = run_cli(*README_EXAMPLE, "--measured", url, "--measured-tokens", "3000", "--json", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    m = out["measured"]
    assert m["used_bytes"] == used and m["tokens_source"] == "given"
    assert m["bits_per_token"] == pytest.approx(4.0)  # 8 x 1500 / 3000
    # The measured plan is the planned one redone at 4 bits/token: four times the egress.
    assert m["plan"]["egress_bytes_per_day"] == pytest.approx(4 * out["egress_bytes_per_day"])
    assert m["plan"]["days_to_exfiltrate"] == pytest.approx(out["days_to_exfiltrate"] / 4)
    assert png.read_bytes()[:4] == b"\x89PNG"
    r2 = run_cli(*README_EXAMPLE, "--measured", url)
    assert r2.returncode == 0, r2.stderr
    assert "the ledger counts bytes, not tokens" in " ".join(r2.stdout.split())
