"""The whole stack with the real openai client and the real SmolLM2 (session-scoped stack)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from e2estack import Stack

pytestmark = pytest.mark.integration

CHAT = [{"role": "user", "content": "Name three colors."}]


def test_chat_plain_and_streaming(stack):
    c = stack.client()
    r = c.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason in ("length", "stop")
    tok = stack.strong.tokenizer
    prompt_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # what the stack says equals what SmolLM2 says alone (greedy)
    s = stack.strong.session(prompt_ids)
    ref = []
    for _ in range(r.usage.completion_tokens):
        t = int(s.logits().argmax())
        ref.append(t)
        s.feed(t)
    assert tok.decode(ref, skip_special_tokens=True).startswith(text)


def test_completions_plain_and_streaming(stack):
    c = stack.client()
    kw = dict(model="smollm2", prompt="The capital of France is", max_tokens=8, seed=5, temperature=0.7)
    r = c.completions.create(**kw)
    assert r.usage.completion_tokens <= 8 and r.choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kw) if ch.choices)
    assert streamed == r.choices[0].text


def test_stop_sequence(stack):
    c = stack.client()
    full = c.completions.create(model="smollm2", prompt="List: apples, pears,", max_tokens=16, temperature=0).choices[0].text
    words = [w for w in full.split() if len(w) > 2]
    assert words, full
    stop = words[min(1, len(words) - 1)]
    r = c.completions.create(model="smollm2", prompt="List: apples, pears,", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seed_reproducible(stack):
    c = stack.client()
    kw = dict(model="smollm2", messages=CHAT, max_tokens=12, temperature=1.0)
    a = c.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = c.chat.completions.create(seed=1234, **kw).choices[0].message.content
    assert a == b


@pytest.mark.parametrize("param", [{"n": 2}, {"logprobs": True}, {"top_logprobs": 3}])
def test_refused_chat_params(stack, param):
    with pytest.raises(openai.BadRequestError) as e:
        stack.client().chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4, **param)
    assert "egress" in e.value.message


@pytest.mark.parametrize("param", [{"echo": True}, {"best_of": 3}, {"suffix": "end"}, {"logprobs": 2}])
def test_refused_completion_params(stack, param):
    with pytest.raises(openai.BadRequestError) as e:
        stack.client().completions.create(model="smollm2", prompt="x", max_tokens=4, **param)
    assert "egress" in e.value.message


def test_unknown_key_401(stack):
    with pytest.raises(openai.AuthenticationError):
        stack.client("sk-nope").chat.completions.create(model="smollm2", messages=CHAT, max_tokens=2)


def test_twenty_concurrent_clients(stack):
    prompts = [f"Write one word that rhymes with {w}:" for w in
               "cat dog sun tree blue red car star moon rain book fish hat king ring bell cake lake door sky".split()]
    tok = stack.strong.tokenizer
    refs = []
    for p in prompts:  # SmolLM2 alone, greedy
        s = stack.strong.session(tok.encode(p))
        ids = []
        for _ in range(6):
            t = int(s.logits().argmax())
            ids.append(t)
            if t == tok.eos_token_id:
                break
            s.feed(t)
        refs.append(tok.decode(ids, skip_special_tokens=True))

    def one(p):
        return stack.client().completions.create(model="smollm2", prompt=p, max_tokens=6, temperature=0).choices[0].text

    with ThreadPoolExecutor(20) as ex:
        got = list(ex.map(one, prompts))
    assert got == refs


def test_cap_exhausted_mid_stream(models, tmp_path):
    s = Stack(models[0], models[1], tmp_path, cap=120, flush_every=2)
    try:
        c = s.client()
        got, finish = [], []
        # The outside here has no meter figures to admit by, so the cap runs out mid-answer: the
        # text that crossed is the answer, cut at "length" (docs/serving-api.md).
        for ch in c.completions.create(model="smollm2", prompt="Tell me a long story about a dragon.",
                                       max_tokens=100, seed=3, temperature=1.0, stream=True):
            if ch.choices:
                got.append(ch.choices[0].text)
                finish.append(ch.choices[0].finish_reason)
        assert finish[-1] == "length"
        assert "".join(got)
        if s.real_meter:  # the meter's own count: nothing beyond the cap left
            from exfilguard.ledger.reads import budget_status

            st = budget_status(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
            assert st.used_bytes <= st.cap_bytes == 120 and st.remaining_bytes == 0
        else:
            assert s.meter.used <= s.meter.cap
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="smollm2", prompt="x", max_tokens=2)
    finally:
        s.close()


def test_meter_killed_503(models, tmp_path):
    s = Stack(models[0], models[1], tmp_path)
    try:
        c = s.client()
        assert c.completions.create(model="smollm2", prompt="Hi", max_tokens=2, temperature=0).choices
        s.kill_meter()
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="smollm2", prompt="Hi", max_tokens=2)
        assert e.value.status_code == 503
    finally:
        s.close()
