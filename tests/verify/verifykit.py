"""Test helper: answers from the inside's own engine (continuous batching, seeded sampling)."""

from __future__ import annotations

import threading


def engine_answers(model, reqs: list[tuple[list[int], int, float]], tokens: int) -> list[list[int]]:
    """Answers from the inside's own engine, all in one continuous batch."""
    from exfilguard.inside.engine import Job, LocalEngine
    from exfilguard.protocol.wire import GenerationRequest

    class Sink:
        def __init__(self) -> None:
            self.ids: list[int] = []
            self.ev = threading.Event()

        def tokens(self, ids) -> bool:
            self.ids.extend(int(t) for t in ids)
            return False

        def done(self, reason: str) -> None:
            self.ev.set()

    eng = LocalEngine(model, max_batch=16)
    eng.start()
    sinks = []
    try:
        for p, seed, t in reqs:
            s = Sink()
            eng.submit(Job(GenerationRequest(prompt_ids=p, max_tokens=tokens, seed=seed, temperature=t), s))
            sinks.append(s)
        for s in sinks:
            assert s.ev.wait(120)
    finally:
        eng.stop()
    return [s.ids for s in sinks]
