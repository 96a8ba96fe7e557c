"""The outside API's /metrics: tokens decoded from what crossed the meter (the dashboard's bits per token)."""

from __future__ import annotations

import httpx


def _counters(base: str) -> dict[str, float]:
    r = httpx.get(base.removesuffix("/v1") + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split()
            out[name] = float(value)
    return out


def test_metrics_count_the_tokens_of_each_answer(tiny_stack):
    before = _counters(tiny_stack.base_url)
    c = tiny_stack.client()
    r = c.completions.create(model="tiny-random", prompt="Hello", max_tokens=8, seed=5, temperature=0.7)
    after = _counters(tiny_stack.base_url)
    assert after["exfilguard_outside_tokens_total"] - before["exfilguard_outside_tokens_total"] == r.usage.completion_tokens
    assert after["exfilguard_outside_bytes_in_total"] > before["exfilguard_outside_bytes_in_total"]
    # Streamed answers count the same way.
    chunks = list(c.completions.create(model="tiny-random", prompt="Once", max_tokens=6, seed=1, temperature=1.0, stream=True,
                                       stream_options={"include_usage": True}))
    again = _counters(tiny_stack.base_url)
    assert again["exfilguard_outside_tokens_total"] - after["exfilguard_outside_tokens_total"] == chunks[-1].usage.completion_tokens
