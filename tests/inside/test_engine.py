"""The continuous-batching engine and the openai: upstream backend, with tiny-random."""



import json
import threading
import time

import pytest

from exfilguard.inside.engine import Job, LocalEngine
from exfilguard.protocol.wire import GenerationRequest


class Sink:
    def __init__(self, stop_after: int | None = None):
        self.ids: list[int] = []
        self.reason: str | None = None
        self.ev = threading.Event()
        self.stop_after = stop_after

    def tokens(self, ids):
        self.ids += list(ids)
        return self.stop_after is not None and len(self.ids) >= self.stop_after

    def done(self, reason):
        self.reason = reason
        self.ev.set()


@pytest.fixture(scope="module")
def tiny():
    from exfilguard.models import load_model

    return load_model("tiny-random")


def _run(model, reqs, stagger=0.0):
    e = LocalEngine(model)
    e.start()
    sinks = []
    for r in reqs:
        sinks.append(Sink())
        e.submit(Job(r, sinks[-1]))
        time.sleep(stagger)
    for s in sinks:
        assert s.ev.wait(60)
    e.stop()
    return [(s.ids, s.reason) for s in sinks]


def test_batched_equals_alone(tiny):
    reqs = [GenerationRequest(list(range(5, 5 + n)), 10, seed=i, temperature=t)
            for i, (n, t) in enumerate([(3, 0.0), (9, 1.0), (5, 0.7), (2, 0.0), (12, 1.0)])]
    alone = [_run(tiny, [r])[0] for r in reqs]
    assert _run(tiny, reqs) == alone
    assert _run(tiny, reqs, stagger=0.02) == alone  # joining a running batch changes nothing
    assert all(reason == "length" and len(ids) == 10 for ids, reason in alone)


def test_stop_and_cancel(tiny):
    e = LocalEngine(tiny)
    e.start()
    stopper, runner = Sink(stop_after=3), Sink()
    job = Job(GenerationRequest([1, 2], 4000, seed=1), runner)
    e.submit(Job(GenerationRequest([1, 2], 50, seed=2), stopper))
    e.submit(job)
    assert stopper.ev.wait(30) and stopper.reason == "stop" and len(stopper.ids) == 3
    time.sleep(0.2)
    job.cancel()
    assert runner.ev.wait(30) and runner.reason == "cancelled" and len(runner.ids) < 4000
    e.stop()


def test_openai_upstream_backend():
    """A fake vLLM that streams token ids; the backend hands them to the sink."""



    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    from exfilguard.inside.upstream import OpenAIUpstream, parse_openai_spec
    from exfilguard.outside.serve import UvicornThreadless
    from exfilguard.supervise.assemble import LoopThread

    app = FastAPI()
    seen = {}

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": "fake"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        seen.update(body)

        async def gen():
            for i in range(body["max_tokens"]):
                ch = {"choices": [{"index": 0, "text": "x", "token_ids": [100 + i], "finish_reason": None}]}
                yield "data: " + json.dumps(ch) + "\n\n"
            yield 'data: {"choices":[{"index":0,"text":"","token_ids":[],"finish_reason":"length"}]}\n\n'
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    lt = LoopThread()
    srv = UvicornThreadless(app, "127.0.0.1", 0)
    port = lt.run(srv.start())
    try:
        assert parse_openai_spec("openai:http://h:1/v1?model=m") == ("http://h:1/v1", "m")
        up = OpenAIUpstream(f"openai:http://127.0.0.1:{port}")
        up.start()
        s = Sink()
        up.submit(Job(GenerationRequest([1, 2, 3], 5, seed=9, temperature=0.5), s))
        assert s.ev.wait(30)
        assert s.ids == [100, 101, 102, 103, 104] and s.reason == "length"
        assert seen["prompt"] == [1, 2, 3] and seen["model"] == "fake" and seen["return_token_ids"] is True
        up.stop()
    finally:
        lt.run(srv.stop())
        lt.close()



class _Region:
    """Counts the sink calls inside the weak model's batching region at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def __call__(self):
        import contextlib

        @contextlib.contextmanager
        def cm():
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            try:
                time.sleep(0.01)  # a weak-model pass
                yield
            finally:
                with self.lock:
                    self.now -= 1

        return cm()


class _Encoder:
    def __init__(self, region):
        self.region = region


def test_a_steps_tokens_reach_their_sinks_together(tiny):
    """Every row's sink call of a step runs at once, inside the encoder's batching region (so the
    weak model can serve the rows in one pass); the tokens are those of the rows run alone."""
    region = _Region()
    reqs = [GenerationRequest(list(range(5, 5 + n)), 6, seed=i, temperature=0.7) for i, n in enumerate((2, 4, 3))]
    alone = [_run(tiny, [r])[0] for r in reqs]
    sinks = [Sink() for _ in reqs]
    for s in sinks:
        s.encoder = _Encoder(region)
    assert _run_queued(tiny, reqs, sinks) == alone
    assert region.most == len(reqs)


def _run_queued(model, reqs, sinks):
    """Submit every request before the engine starts (they wait together), run them to the end."""
    e = LocalEngine(model)
    for r, s in zip(reqs, sinks):
        e.submit(Job(r, s))
    e.start()
    for s in sinks:
        assert s.ev.wait(60)
    e.stop()
    return [(s.ids, s.reason) for s in sinks]


def test_prompts_that_arrive_together_share_one_prefill(tiny):
    """Jobs waiting together are read in one left-padded pass (grouped by length), with the
    tokens they get alone; a long prompt is read on its own."""
    reqs = [GenerationRequest(list(range(5, 5 + n)), 6, seed=i, temperature=t)
            for i, (n, t) in enumerate([(3, 0.7), (9, 1.0), (5, 0.0), (7, 0.7), (300, 0.7)])]
    alone = [_run(tiny, [r])[0] for r in reqs]
    calls: list[tuple[int, int]] = []
    inner = tiny.model.forward

    def counting(*a, **k):
        ids = k.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            calls.append(tuple(ids.shape))
        return inner(*a, **k)

    tiny.model.forward = counting
    try:
        assert _run_queued(tiny, reqs, [Sink() for _ in reqs]) == alone
    finally:
        del tiny.model.forward
    assert sorted(calls) == [(1, 300), (4, 9)]
