"""Test helper: answers from the inside's own engine (continuous batching, seeded sampling)."""

from __future__ import annotations


def engine_answers(model, reqs: list[tuple[list[int], int, float]], tokens: int) -> list[list[int]]:
    """Answers from the inside's own engine, all in one continuous batch (each within 120 s)."""
    from exfilguard.inside.engine import engine_answers as answers

    return answers(model, reqs, tokens, max_batch=16, timeout=120)
