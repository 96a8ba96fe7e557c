"""Bad input gets a 4xx in OpenAI's shape, never a 500: real sockets against the tiny-random stack."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tinystack import KEY

H = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def _shape(r: httpx.Response) -> dict:
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    return e


@pytest.mark.parametrize("path,body,param", [
    ("/chat/completions", '{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 3}', "messages[0].content"),
    ("/completions", '{"prompt": "\\udfff", "max_tokens": 3}', "prompt"),
    ("/completions", '{"prompt": "ok", "stop": ["\\ud800"], "max_tokens": 3}', "stop[0]"),
    ("/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}', "messages[0].content[0].text"),
])
def test_lone_surrogate_is_400_naming_the_field(tiny_stack, path, body, param):
    used = tiny_stack.meter.used
    r = httpx.post(tiny_stack.base_url + path, content=body.encode(), headers=H, timeout=30)
    assert r.status_code == 400, r.text
    e = _shape(r)
    assert e["param"] == param and "surrogate" in e["message"]
    assert tiny_stack.meter.used == used  # nothing reached the inside


def test_deeply_nested_json_is_400(tiny_stack):
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        r = httpx.post(tiny_stack.base_url + "/completions", content=raw, headers=H, timeout=30)
        assert r.status_code == 400, r.text
        assert "nests deeper" in _shape(r)["message"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / (1 << 20)


def test_chunked_body_past_the_limit_is_413_before_it_is_read():
    """A 300 MiB chunked body (no Content-Length) is cut at the 4 MiB limit while it streams in: the
    outside (in this process) never holds it; read whole, it would add >= 300 MiB to the RSS."""
    import threading

    from tinystack import TinyStack

    s = TinyStack()

    def body():
        chunk = b" " * (1 << 20)
        for _ in range(300):
            yield chunk

    # The process's current RSS, sampled while the request runs (ru_maxrss is the lifetime peak, which
    # earlier tests in the same process may already have set above anything this request does).
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            samples.append(_rss_mib())

    watcher = threading.Thread(target=sample, daemon=True)
    try:
        before = _rss_mib()
        watcher.start()
        r = httpx.post(s.base_url + "/completions", content=body(), headers=H, timeout=120)
        done.set()
        watcher.join()
        assert r.status_code == 413 and _shape(r)["code"] == "request_too_large", r.text
        assert samples and max(samples) - before < 150, (before, max(samples, default=None))
        ok = httpx.post(s.base_url + "/completions", json={"prompt": "x", "max_tokens": 2}, headers=H, timeout=60)
        assert ok.status_code == 200  # and it is still serving
    finally:
        done.set()
        s.close()


PARAMS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
          "stream", "stream_options", "n", "logprobs", "user", "response_format", "tools", "logit_bias", "echo"]
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=False),
                      st.text(max_size=20), st.integers(-3, 6))
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                          max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x", 3]),
                                 "content": st.one_of(st.text(max_size=30), json_value)})
body_strategy = st.dictionaries(
    st.sampled_from(PARAMS), json_value, max_size=6,
).flatmap(lambda d: st.fixed_dictionaries({
    **{k: st.just(v) for k, v in d.items()},
    "messages": st.one_of(st.lists(message, max_size=3), json_value),
    "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 60_000), max_size=5), json_value),
    "max_tokens": st.one_of(st.integers(-2, 4), json_value),
}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=body_strategy, chat=st.booleans())
def test_fuzzed_json_bodies_never_get_a_500(tiny_stack, body, chat):
    raw = json.dumps(body).encode()
    r = httpx.post(tiny_stack.base_url + ("/chat/completions" if chat else "/completions"), content=raw, headers=H, timeout=60)
    assert r.status_code < 500, (r.status_code, r.text, body)
    if r.status_code >= 400:
        _shape(r)
