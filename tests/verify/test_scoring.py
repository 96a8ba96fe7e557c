"""Re-execution scores on tiny-random: honest answers from the real engine pass, chosen tokens do not."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from verifykit import engine_answers

from exfilguard.verify.requestlog import RequestLog, read_log
from exfilguard.verify.scoring import Thresholds, judge
from exfilguard.verify.verifier import VerifyConfig, verify_log, verify_records

PROMPTS = [[1, 9690, 198, 2683, 359, 253, 5356] + [100 + i, 200 + 3 * i] for i in range(12)]


@pytest.fixture(scope="module")
def tiny():
    from exfilguard.models import load_model

    return load_model("tiny-random")


@pytest.fixture(scope="module")
def honest(tiny):
    rng = random.Random(1)
    reqs = [(p, rng.getrandbits(63), t) for p in PROMPTS for t in (0.0, 0.7, 1.0)]
    return reqs, engine_answers(tiny, reqs, 24)


def write(path: Path, reqs, answers, seeded: bool = True) -> None:
    log = RequestLog(path)
    for i, ((p, seed, t), ids) in enumerate(zip(reqs, answers)):
        log.append_request(f"r{i}", p, seed if seeded else None, t, 1.0, 24, "coupled", ids, 10, "done")
    log.close()


def test_honest_batched_answers_pass(tiny, honest, tmp_path: Path) -> None:
    reqs, answers = honest
    p = tmp_path / "log.jsonl"
    write(p, reqs, answers)
    rep = verify_log(p, tiny, VerifyConfig(sample_seed=1))
    assert len(rep.scores) == len(reqs) == 36
    assert {s.method for s in rep.scores} == {"greedy", "seeded"}
    assert not rep.flagged, [s.as_dict() for s in rep.flagged]


def stego(tiny, prompt: list[int], n: int, seed: int) -> list[int]:
    from exfilguard.redteam.stego import StegoChooser

    rng = random.Random(seed)
    return StegoChooser(tiny, prompt).embed([rng.getrandbits(1) for _ in range(n)])


def test_stego_answers_are_flagged_seeded_and_unseeded(tiny, tmp_path: Path) -> None:
    rng = random.Random(2)
    reqs = [(p, rng.getrandbits(63), 1.0) for p in PROMPTS[:6]]
    answers = [stego(tiny, p, 24, i) for i, (p, _, _) in enumerate(reqs)]
    p = tmp_path / "log.jsonl"
    write(p, reqs, answers)
    rep = verify_log(p, tiny, VerifyConfig(sample_seed=1))
    assert len(rep.flagged) == 6
    # Unseeded, the likelihood test needs longer answers: the attacker here ranks with the
    # verifier's own model, so its picks are only a little too likely at each token.
    answers = [stego(tiny, p, 96, i) for i, (p, _, _) in enumerate(reqs)]
    q = tmp_path / "unseeded.jsonl"
    write(q, reqs, answers, seeded=False)
    rep = verify_log(q, tiny, VerifyConfig(sample_seed=1))
    assert {s.method for s in rep.scores} == {"likelihood"}
    assert len(rep.flagged) == 6, [s.as_dict() for s in rep.scores]


def test_unseeded_honest_samples_pass_the_likelihood_test(tiny, honest, tmp_path: Path) -> None:
    reqs, answers = honest
    keep = [(r, a) for r, a in zip(reqs, answers) if r[2] > 0]
    p = tmp_path / "log.jsonl"
    write(p, [r for r, _ in keep], [a for _, a in keep], seeded=False)
    rep = verify_log(p, tiny, VerifyConfig(sample_seed=1))
    assert {s.method for s in rep.scores} == {"likelihood"}
    assert not rep.flagged, [s.as_dict() for s in rep.scores]


def test_one_swapped_token_in_a_greedy_answer_is_flagged(tiny, honest) -> None:
    reqs, answers = honest
    (p, seed, t), ids = next((r, a) for r, a in zip(reqs, answers) if r[2] == 0.0)
    lg = tiny.score_fast(p, ids)
    bad = list(ids)
    bad[5] = int(lg[5].argmin())  # the least likely token
    lg_bad = tiny.score_fast(p, bad)
    flips, gap, _, flagged, reason = judge("greedy", lg_bad, bad, None, 0.0, 1.0, Thresholds())
    assert flagged and flips >= 1 and "below the model's choice" in reason


def test_sampling_picks_a_fraction_and_is_keyed(tiny, honest, tmp_path: Path) -> None:
    reqs, answers = honest
    p = tmp_path / "log.jsonl"
    write(p, reqs, answers)
    recs = list(read_log(p))

    class Boom:
        def score_fast(self, *a):
            raise AssertionError("not sampled: must not be scored")

    a = verify_records(tiny, recs, VerifyConfig(sample_rate=0.5, sample_seed=7))
    b = verify_records(tiny, recs, VerifyConfig(sample_rate=0.5, sample_seed=7))
    c = verify_records(tiny, recs, VerifyConfig(sample_rate=0.5, sample_seed=8))
    assert [s.seq for s in a.scores] == [s.seq for s in b.scores]
    assert 0 < len(a.scores) < len(recs)
    assert [s.seq for s in a.scores] != [s.seq for s in c.scores]
    with pytest.raises(Exception, match="sample-rate"):
        verify_records(Boom(), recs, VerifyConfig(sample_rate=0.0))
