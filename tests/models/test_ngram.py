"""The n-gram weak model: exact integer frequencies, Kneser-Ney back-off, stable files."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exfilguard.models import load_model
from exfilguard.models.ngram import FREQ_TOTAL, SCALE, VOCAB_SIZE, load_ngram, train_ngram

PROMPT = (1, 9690, 198)


def _corpus() -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(40):
        gen = [10, 11, 12] + rng.integers(100, 140, size=30).tolist() + [2]
        rows.append((PROMPT, tuple(gen)))
    return rows


@pytest.fixture(scope="module")
def model():
    return train_ngram(_corpus(), order=3)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2, 10, 11, 12, 100, 120, 139, 5000, VOCAB_SIZE - 1]), max_size=5))
def test_frequencies_sum_exactly_and_are_positive(model, ctx):
    f = model.frequencies(ctx)
    assert f.dtype == np.uint32 and f.shape == (VOCAB_SIZE,)
    assert int(f.sum(dtype=np.int64)) == FREQ_TOTAL
    assert int(f.min()) >= 1


def test_session_matches_model_and_logits_are_log_frequencies(model):
    s = model.session(PROMPT)
    for t in (10, 11, 12):
        s.feed(t)
    f = s.frequencies()
    assert np.array_equal(f, model.frequencies([11, 12]))
    assert np.array_equal(s.logits(), np.log(f.astype(np.float64)).astype(np.float32))
    assert s.length == len(PROMPT) + 3


def test_seen_continuation_dominates(model):
    f = model.frequencies([10, 11])
    assert int(np.argmax(f)) == 12  # "10 11" is always followed by 12
    assert f[12] > FREQ_TOTAL // 2


def test_unseen_context_backs_off_to_lower_orders(model):
    # (5000, 11) never occurs, 11 does: the trigram level is skipped, the bigram one used.
    assert np.array_equal(model.probabilities([5000, 11]), model.probabilities([11]))
    # A wholly unseen token leaves only the unigram (continuation) distribution.
    assert np.array_equal(model.probabilities([7, 5000]), model.probabilities([]))
    p = model.probabilities([])
    assert int(p.sum()) <= SCALE and int(p.min()) > 0  # the uniform floor reaches every token


def test_kneser_ney_uses_continuation_counts(model):
    # 12 follows only "11" (one distinct left context); 100..139 follow many. Under raw counts
    # 12 (40 occurrences) would beat a typical body token (~30); under KN it must not.
    p = model.probabilities([])
    assert p[12] < np.median(p[100:140])


def test_save_load_roundtrip_and_spec(model, tmp_path):
    path = tmp_path / "ng.npz"
    model.save(path)
    loaded = load_ngram(path)
    assert loaded.fingerprint == model.fingerprint
    via_spec = load_model(f"ngram:{path}")
    assert via_spec.info.spec == f"ngram:{path}"
    ctx = [10, 11]
    assert np.array_equal(via_spec.session(ctx).frequencies(), model.frequencies(ctx))


def test_bit_exact_across_processes(model, tmp_path):
    path = tmp_path / "ng.npz"
    model.save(path)
    code = (
        "import hashlib,sys; from exfilguard.models.ngram import load_ngram;"
        "m=load_ngram(sys.argv[1]); h=hashlib.sha256()\n"
        "for c in ([], [11], [10, 11], [130, 2], [1, 9690]): h.update(m.frequencies(c).astype('<u4').tobytes())\n"
        "print(h.hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    h = hashlib.sha256()
    for c in ([], [11], [10, 11], [130, 2], [1, 9690]):
        h.update(model.frequencies(c).astype("<u4").tobytes())
    assert out.stdout.strip() == h.hexdigest()


def test_training_is_deterministic():
    assert train_ngram(_corpus(), order=3).fingerprint == train_ngram(_corpus(), order=3).fingerprint
