"""What the issue tripped on, with the real SmolLM2 stack and the real openai client: each is now
answered as vLLM answers it, before anything crosses the meter."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

CHAT = [{"role": "user", "content": "Name three colors."}]


def _metered(stack) -> int:
    return stack.outside.server.config.app.state.connection.bytes_in


def test_unknown_model_404(stack):
    before = _metered(stack)
    with pytest.raises(openai.NotFoundError) as e:
        stack.client().chat.completions.create(model="gpt-5-ultra", messages=CHAT, max_tokens=4)
    assert e.value.code == "model_not_found"
    assert _metered(stack) == before


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
      "tool_choice": "auto"}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "object"}}}}, "response_format"),
    ({"logit_bias": {"1": 50}}, "logit_bias"),
])
def test_parameters_that_change_the_answer_are_refused(stack, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        stack.client().chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4, **extra)
    assert e.value.param == param


def test_8001_token_prompt_with_300_max_tokens_is_refused_up_front(stack):
    before = _metered(stack)
    c = stack.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="smollm2", prompt=[504] * 8001, max_tokens=300)
    assert e.value.param == "max_tokens" and "(300 > 8192 - 8001)" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="smollm2", prompt=[504] * 8192, max_tokens=1)
    assert e.value.param == "prompt"
    assert _metered(stack) == before


def test_route_and_method_errors_in_openai_shape(stack):
    h = {"Authorization": "Bearer sk-e2e-key"}
    for r, code in [(httpx.get(stack.base_url + "/embeddings", headers=h), 404),
                    (httpx.put(stack.base_url + "/completions", headers=h), 405)]:
        assert r.status_code == code
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_finish_reason_length_at_max_tokens(stack):
    r = stack.client().chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Tell me a long story about a dragon."}], max_tokens=8, temperature=0)
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
