"""The outside API end to end over real sockets with tiny-random and the real openai client."""

from __future__ import annotations

import httpx
import openai
import pytest


def test_chat_and_completion(tiny_stack):
    c = tiny_stack.client()
    r = c.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "hi"}], max_tokens=8, seed=3)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens >= 1
    r2 = c.completions.create(model="tiny-random", prompt="Hello", max_tokens=8, seed=3, temperature=0.7)
    assert r2.usage.completion_tokens == 8 and r2.choices[0].finish_reason == "length"


def test_seed_reproducible_streaming_equals_plain(tiny_stack):
    c = tiny_stack.client()
    kw = dict(model="tiny-random", prompt="Once upon", max_tokens=10, seed=42, temperature=1.0)
    a = c.completions.create(**kw).choices[0].text
    b = c.completions.create(**kw).choices[0].text
    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert a == b == streamed
    assert chunks[-1].usage.completion_tokens == 10


@pytest.mark.parametrize("param", [{"n": 2}, {"logprobs": True}, {"top_logprobs": 2}])
def test_chat_refuses_egress_params(tiny_stack, param):
    c = tiny_stack.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "x"}], max_tokens=4, **param)
    assert "egress" in e.value.message


@pytest.mark.parametrize("param", [{"echo": True}, {"best_of": 2}, {"suffix": "x"}, {"logprobs": 1}])
def test_completions_refuses_egress_params(tiny_stack, param):
    with pytest.raises(openai.BadRequestError) as e:
        tiny_stack.client().completions.create(model="tiny-random", prompt="x", max_tokens=4, **param)
    assert "egress" in e.value.message


def test_401_and_400(tiny_stack):
    with pytest.raises(openai.AuthenticationError):
        tiny_stack.client("wrong").models.list()
    r = httpx.post(tiny_stack.base_url + "/chat/completions", content=b"{}", headers={"Authorization": "Bearer x"})
    assert r.status_code == 401
    r = httpx.post(tiny_stack.base_url + "/chat/completions", json={"messages": [], "max_tokens": 3},
                   headers={"Authorization": "Bearer sk-test-key"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(tiny_stack.base_url + "/completions", json={"prompt": "x", "max_tokens": "many"},
                   headers={"Authorization": "Bearer sk-test-key"})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    assert tiny_stack.client().models.list().data[0].id == "tiny-random"


def test_concurrent_clients_match_alone(tiny_stack):
    from concurrent.futures import ThreadPoolExecutor

    c = tiny_stack.client()

    def one(i):
        return c.completions.create(model="tiny-random", prompt=f"n{i}", max_tokens=6, seed=i, temperature=1.0).choices[0].text

    alone = [one(i) for i in range(4)]
    with ThreadPoolExecutor(12) as ex:
        together = list(ex.map(one, list(range(12))))
    assert together[:4] == alone
