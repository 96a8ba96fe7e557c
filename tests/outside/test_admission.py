"""Admission looks at what an answer may cost: under a small global cap and a small key budget, every
byte the meter forwarded is in some answer's access-log line (plus the connection's HELLO), and no
request spends bytes without returning text. Real meter process, real ledger, real openai client."""

from __future__ import annotations

import json
import logging
import random

import openai
import pytest
from tinystack import KEY, TinyStack, access_lines

from exfilguard.ledger.apikeys import KeyStore
from exfilguard.ledger import reads
from exfilguard.ledger import open_ledger
from exfilguard.protocol.wire import Kind, encode_frame

from test_keys import add_key


@pytest.fixture()
def small(tmp_path):
    s = TinyStack(keys_ledger=f"sqlite:///{tmp_path / 'keys.sqlite'}", meter_ledger=f"sqlite:///{tmp_path / 'meter.sqlite'}",
                  cap=600)
    s.keys_url, s.meter_url = f"sqlite:///{tmp_path / 'keys.sqlite'}", f"sqlite:///{tmp_path / 'meter.sqlite'}"
    yield s
    s.close()


def test_access_log_bytes_explain_the_ledger_and_no_bytes_are_spent_for_nothing(small, caplog):
    caplog.set_level(logging.INFO, logger="exfilguard.access")
    secret = add_key(small.keys_url, "kim", "--cap", "200")
    rng = random.Random(7)
    outcomes = []
    n = 50
    for i in range(n):
        c = small.client(secret if i % 2 else KEY)
        kw = dict(model="tiny-random", prompt=f"Hello {i}", max_tokens=rng.choice([3, 8, 20, 60]), seed=i,
                  temperature=rng.choice([0.0, 1.0]))
        try:
            if i % 3 == 0:
                chunks = list(c.completions.create(stream=True, **kw))
                text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
                finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
            else:
                r = c.completions.create(**kw)
                text, finish = r.choices[0].text, r.choices[0].finish_reason
            outcomes.append(("ok", text, finish))
        except openai.RateLimitError as e:
            outcomes.append((e.body["type"], "", None))
    lines = access_lines(caplog, n)
    assert len(lines) == n
    kinds = [o[0] for o in outcomes]

    # the run reached both limits: the key's, then the meter's cap
    assert "key_budget_exhausted" in kinds and "egress_budget_exhausted" in kinds and kinds.count("ok") >= 10
    for (kind, text, finish), line in zip(outcomes, lines):
        if kind == "ok":
            assert line["status"] == 200 and line["completion_tokens"] > 0 and line["meter_bytes"] > 0
            assert finish in ("stop", "length")
        else:  # refused before it ran: nothing reached the inside, nothing crossed the meter
            assert line["status"] == 429 and not line["meter_bytes"] and not line["completion_tokens"]
    # 0 requests that spend bytes and return no text
    assert not [a for a in lines if a["meter_bytes"] and not a["completion_tokens"]]
    conn = small.outside.server.config.app.state.connection
    hello = len(encode_frame(Kind.HELLO, 0, conn.hello.to_bytes()))
    logged = sum(a["meter_bytes"] or 0 for a in lines)
    store = KeyStore(open_ledger(small.keys_url))
    kim = store.status(store.lookup(secret))
    assert kim.used_bytes <= 200 and kim.forwarded_bytes == sum(a["meter_bytes"] or 0 for a in lines if a["key"] == "kim")
    small.close()  # the meter settles its reservations as it stops
    small.close = lambda: None
    led = open_ledger(small.meter_url, create=False)
    st = reads.status(led, None)
    led.close()
    # one connection through the meter: its HELLO is the only byte no answer carries
    assert st.forwarded_bytes == logged + hello == conn.bytes_in
    assert st.forwarded_bytes <= 600
