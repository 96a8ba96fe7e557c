"""Cap exhausted mid-stream, meter down, client gone: with tiny-random and a stand-in meter."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from tinystack import KEY, TinyStack


def test_cap_exhausted_mid_stream_then_429():
    """With no meter figures to admit by (a stand-in meter), the cap can still run out mid-answer:
    the text that crossed is the answer, cut at "length"; the next request is a 429."""
    s = TinyStack(cap=120, flush_every=2)
    try:
        c = s.client()
        got, finish = [], []
        for ch in c.completions.create(model="tiny-random", prompt="Hello there", max_tokens=200, seed=1, temperature=1.0, stream=True):
            if ch.choices:
                got.append(ch.choices[0].text)
                finish.append(ch.choices[0].finish_reason)
        assert "".join(got)  # what the cap covered arrived
        assert finish[-1] == "length"
        assert s.meter.used <= s.meter.cap
        with pytest.raises(openai.RateLimitError) as e2:
            c.completions.create(model="tiny-random", prompt="x", max_tokens=4)
        assert e2.value.body["type"] == "egress_budget_exhausted"
    finally:
        s.close()


def test_meter_down_is_503():
    s = TinyStack()
    try:
        c = s.client()
        assert c.completions.create(model="tiny-random", prompt="x", max_tokens=3, seed=1).usage.completion_tokens == 3
        s.lt.run(s.meter.stop())
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="tiny-random", prompt="x", max_tokens=3)
        assert e.value.status_code == 503
        assert e.value.body["type"] == "upstream_unavailable"
    finally:
        s.close()


def test_client_disconnect_cancels_generation():
    s = TinyStack()
    try:
        engine = s.inside.backend
        with httpx.stream("POST", s.base_url + "/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"prompt": "x", "max_tokens": 4000, "stream": True, "seed": 1}, timeout=30) as r:
            assert r.status_code == 200
            for _ in zip(range(5), r.iter_lines()):
                pass
        deadline = time.monotonic() + 20
        while engine._rows and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine._rows  # the inside stopped generating for the gone client
    finally:
        s.close()


def test_weak_model_mismatch_is_500_naming_both():
    s = TinyStack(outside_fingerprint="0" * 64)
    try:
        with pytest.raises(openai.InternalServerError) as e:
            s.client().completions.create(model="tiny-random", prompt="x", max_tokens=3)
        assert e.value.status_code == 500
        assert "0" * 64 in e.value.message and s.model.info.fingerprint[:16] in e.value.message
    finally:
        s.close()


def test_client_disconnect_mid_non_streaming_answer_is_499_and_stops_the_inside(caplog):
    """A non-streaming answer sends nothing until it is whole, so only a watch on the connection can see
    the client leave: the answer stops (the inside drops its row on CANCEL) and the log says 499
    with the meter bytes it spent."""
    import json
    import logging
    import socket

    from tinystack import access_lines

    caplog.set_level(logging.INFO, logger="exfilguard.access")
    s = TinyStack()
    try:
        engine = s.inside.backend
        body = json.dumps({"prompt": "x", "max_tokens": 4000, "seed": 1, "temperature": 1.0}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while not engine._rows and time.monotonic() < deadline:  # generating
            time.sleep(0.01)
        assert engine._rows
        start = engine.steps
        sock.close()  # the client gives up
        while engine._rows and time.monotonic() < deadline + 30:
            time.sleep(0.01)
        assert not engine._rows  # the inside stopped generating for it
        assert engine.steps - start < 3000  # long before its 4000 tokens
        (line,) = access_lines(caplog, 1)
        assert line["status"] == 499 and isinstance(line["meter_bytes"], int)
    finally:
        s.close()
