"""The OpenAI surface as vLLM's server defines it: unknown models, unsupported parameters, the
context limit, and errors in OpenAI's shape everywhere (real sockets, real openai client)."""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest
from tinystack import KEY, access_lines

H = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "hi"}]


def _shape(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, r.text
    assert "detail" not in r.json()
    return err


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404_model_not_found(tiny_stack, stream):
    used = tiny_stack.meter.used
    c = tiny_stack.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-5-ultra", messages=CHAT, max_tokens=4, stream=stream)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    assert "gpt-5-ultra" in e.value.message
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-5-ultra", prompt="x", max_tokens=4)
    assert tiny_stack.meter.used == used  # nothing crossed the meter for a refused request


UNSUPPORTED = [
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}),
    ("tool_choice", {"tool_choice": "required"}),
    ("tool_choice", {"tool_choice": {"type": "function", "function": {"name": "f"}}}),
    ("functions", {"functions": [{"name": "f", "parameters": {"type": "object"}}]}),
    ("function_call", {"function_call": "auto"}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("response_format", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}),
    ("logit_bias", {"logit_bias": {"42": 100}}),
    ("presence_penalty", {"presence_penalty": 0.5}),
    ("frequency_penalty", {"frequency_penalty": 1.0}),
]


@pytest.mark.parametrize("param,extra", UNSUPPORTED, ids=[f"{p}-{i}" for i, (p, _) in enumerate(UNSUPPORTED)])
def test_chat_refuses_parameters_it_would_ignore(tiny_stack, param, extra):
    used = tiny_stack.meter.used
    with pytest.raises(openai.BadRequestError) as e:
        tiny_stack.client().chat.completions.create(model="tiny-random", messages=CHAT, max_tokens=4, extra_body=extra)
    assert e.value.param == param
    assert f"'{param}'" in e.value.message
    assert tiny_stack.meter.used == used


@pytest.mark.parametrize("extra,param", [({"logit_bias": {"7": -100}}, "logit_bias"),
                                         ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
                                         ({"extra_body": {"ignore_eos": True}}, "ignore_eos")])
def test_completions_refuses_parameters_it_would_ignore(tiny_stack, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        tiny_stack.client().completions.create(model="tiny-random", prompt="x", max_tokens=4, **extra)
    assert e.value.param == param


def test_no_op_values_of_those_parameters_are_served(tiny_stack):
    r = tiny_stack.client().chat.completions.create(
        model="tiny-random", messages=CHAT, max_tokens=3, seed=1, response_format={"type": "text"},
        presence_penalty=0, frequency_penalty=0.0, logit_bias={}, tool_choice="none")
    assert r.usage.completion_tokens >= 1


def test_404_405_413_in_openai_shape(tiny_stack):
    r = httpx.get(tiny_stack.base_url + "/nothing-here", headers=H)
    assert r.status_code == 404 and _shape(r)["code"] == "not_found"
    r = httpx.get(tiny_stack.base_url + "/chat/completions", headers=H)
    assert r.status_code == 405 and _shape(r)["code"] == "method_not_allowed"
    r = httpx.delete(tiny_stack.base_url + "/models", headers=H)
    assert r.status_code == 405 and _shape(r)["type"] == "invalid_request_error"
    big = json.dumps({"model": "tiny-random", "prompt": "x" * (5 << 20), "max_tokens": 1})
    r = httpx.post(tiny_stack.base_url + "/completions", content=big, headers={**H, "Content-Type": "application/json"})
    assert r.status_code == 413 and _shape(r)["code"] == "request_too_large"
    r = httpx.post(tiny_stack.base_url + "/completions", content=b"{nope", headers=H)
    assert r.status_code == 400 and _shape(r)["param"] == "body"


def test_too_long_prompt_names_prompt_on_completions(tiny_stack):
    used = tiny_stack.meter.used
    c = tiny_stack.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-random", prompt=[5] * 4096, max_tokens=4)
    assert e.value.param == "prompt"
    assert "maximum context length is 4096 tokens" in e.value.message and "4096 input tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "word " * 5000}], max_tokens=4)
    assert e.value.param == "messages"
    assert "- This model's maximum context length is 4096 tokens. However, your request has " in e.value.message
    assert tiny_stack.meter.used == used


def test_prompt_plus_max_tokens_past_the_context_is_refused_up_front(tiny_stack):
    used = tiny_stack.meter.used
    with pytest.raises(openai.BadRequestError) as e:
        tiny_stack.client().completions.create(model="tiny-random", prompt=[5] * 4000, max_tokens=300)
    assert e.value.param == "max_tokens"
    assert "(300 > 4096 - 4000)" in e.value.message
    assert tiny_stack.meter.used == used


def test_answer_ending_at_the_context_limit_says_length(tiny_stack):
    c = tiny_stack.client()
    # exactly fits: 4090 prompt tokens + 6 = the whole context
    r = c.completions.create(model="tiny-random", prompt=[5] * 4090, max_tokens=6, seed=2, temperature=1.0)
    assert r.usage.completion_tokens <= 6
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 6 else "stop")
    # no max_tokens: the default (16) is cut to the 6 tokens of room left, as vLLM does
    raw = httpx.post(tiny_stack.base_url + "/completions", headers=H, timeout=120,
                     json={"model": "tiny-random", "prompt": [5] * 4090, "seed": 2, "temperature": 1.0}).json()
    assert raw["usage"]["completion_tokens"] <= 6
    assert raw["choices"][0]["text"] == r.choices[0].text


def test_finish_reason_length_at_max_tokens_streaming(tiny_stack):
    chunks = list(tiny_stack.client().chat.completions.create(
        model="tiny-random", messages=CHAT, max_tokens=5, seed=9, temperature=1.0, stream=True,
        stream_options={"include_usage": True}))
    fins = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    n = chunks[-1].usage.completion_tokens
    assert fins == ["length" if n == 5 else "stop"]


def test_access_log_line_per_request(tiny_stack, caplog):
    caplog.set_level(logging.INFO, logger="exfilguard.access")
    c = tiny_stack.client()
    r = c.completions.create(model="tiny-random", prompt="Hello", max_tokens=6, seed=4, temperature=1.0)
    list(c.completions.create(model="tiny-random", prompt="Hello", max_tokens=6, seed=4, temperature=1.0, stream=True))
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    lines = access_lines(caplog, 3)  # a stream logs once its client has hung up: order may vary
    refused = next(a for a in lines if a["status"] == 404)
    plain = next(a for a in lines if a.get("stream") is False and a["status"] == 200)
    streamed = next(a for a in lines if a.get("stream") is True)
    for a in (plain, streamed):
        assert a["status"] == 200 and a["path"] == "/v1/completions" and a["key"] == "api-keys-file"
        assert a["model"] == "tiny-random" and a["prompt_tokens"] == r.usage.prompt_tokens
        assert a["completion_tokens"] == r.usage.completion_tokens
        assert a["meter_bytes"] > 0 and a["bits_per_token"] == round(8 * a["meter_bytes"] / a["completion_tokens"], 3)
        assert a["latency_ms"] >= 0
    assert streamed["stream"] is True and plain["stream"] is False
    assert refused["status"] == 404 and refused["meter_bytes"] is None


def test_max_tokens_over_the_servers_limit_says_so(tiny_stack):
    """The limit is documented (docs/serving-api.md) and the message names it."""
    with pytest.raises(openai.BadRequestError) as e:
        tiny_stack.client().completions.create(model="tiny-random", prompt="x", max_tokens=5000)
    assert e.value.param == "max_tokens"
    assert e.value.message.endswith("- 'max_tokens' is too large: 5000. This server generates at most 4096 tokens per answer.")
    with pytest.raises(openai.BadRequestError) as e:
        tiny_stack.client().completions.create(model="tiny-random", prompt="x", max_tokens=0)
    assert e.value.message.endswith("- 'max_tokens' must be at least 1")


def test_access_log_file_has_every_request_but_the_scrapes(tmp_path):
    import json as _json

    from tinystack import TinyStack

    path = tmp_path / "access.jsonl"
    s = TinyStack(access_log_file=str(path))
    try:
        c = s.client()
        for _ in range(3):
            httpx.get(s.base_url.removesuffix("/v1") + "/metrics")  # the dashboard's scrape: not logged
        c.completions.create(model="tiny-random", prompt="x", max_tokens=3, seed=1)
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="nope", prompt="x", max_tokens=3)
        httpx.get(s.base_url.removesuffix("/v1") + "/health")
    finally:
        s.close()
    lines = [_json.loads(x) for x in path.read_text().splitlines()]
    assert [(a["method"], a["path"], a["status"]) for a in lines] == [
        ("POST", "/v1/completions", 200), ("POST", "/v1/completions", 404), ("GET", "/health", lines[2]["status"])]
    assert lines[0]["meter_bytes"] > 0 and lines[0]["completion_tokens"] == 3
