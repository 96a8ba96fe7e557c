"""The match model: integer predictions both sides agree on, exact mixtures, and coding with it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exfilguard.codec import decode_stream, encode_stream, get_codec
from exfilguard.errors import ConfigError
from exfilguard.models import load_model
from exfilguard.models import match as M
from exfilguard.models.ngram import FREQ_TOTAL, VOCAB_SIZE, train_ngram

PROMPT = (1, 9690, 198)


def brute_predict(h: list[int]) -> tuple[int, int]:
    """The most recent earlier occurrence of the last MIN_MATCH ids, and the backward match length."""
    n = len(h)
    if n < M.MIN_MATCH:
        return -1, 0
    for j in range(n - 1, M.MIN_MATCH - 1, -1):
        if h[j - M.MIN_MATCH : j] == h[n - M.MIN_MATCH :]:
            length = M.MIN_MATCH
            while length < M.MAX_MATCH and j - length - 1 >= 0 and h[j - length - 1] == h[n - length - 1]:
                length += 1
            return h[j], length
    return -1, 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=80))
def test_predictor_matches_brute_force(ids):
    p = M.MatchPredictor()
    for i, t in enumerate(ids):
        assert p.predict() == brute_predict(ids[:i])
        p.feed(t)
    assert p.predict() == brute_predict(ids)


def test_prefix_is_the_same_as_feeding():
    ids = [5, 6, 7, 5, 6, 7, 5, 6]
    a = M.MatchPredictor(ids)
    b = M.MatchPredictor()
    for t in ids:
        b.feed(t)
    assert a.predict() == b.predict() == (7, 5)  # j = 5: ids[0:5] ends like ids[3:8]


def test_long_repeat_caps_the_length():
    p = M.MatchPredictor(list(range(50)) + list(range(49)))
    assert p.predict() == (49, M.MAX_MATCH)
    assert M.bucket(M.MAX_MATCH) == len(M.EDGES) - 1
    assert [M.bucket(x) for x in (2, 3, 5, 6)] == [0, 1, 2, 3]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, VOCAB_SIZE - 1), st.integers(1, 255), st.integers(0, 2**32 - 1))
def test_frequency_mixture_is_exact(token, w, seed):
    rng = np.random.default_rng(seed)
    f = rng.integers(1, 300, size=VOCAB_SIZE).astype(np.int64)  # sum < 2**24
    f[rng.integers(VOCAB_SIZE)] += FREQ_TOTAL - int(f.sum())
    out = M.mix_frequencies(f.astype(np.uint32), token, w)
    assert out.dtype == np.uint32 and int(out.sum(dtype=np.int64)) == FREQ_TOTAL and int(out.min()) >= 1
    # the predicted token gains about w/256 of the mass
    assert abs(int(out[token]) - (int(f[token]) * (256 - w) / 256 + w * 2**16)) <= VOCAB_SIZE + 1


def test_logit_mixture_is_the_probability_mixture():
    rng = np.random.default_rng(1)
    lg = rng.normal(size=1000).astype(np.float32) * 3
    out = M.mix_logits(lg, 7, 64)
    p = np.exp(lg.astype(np.float64) - np.logaddexp.reduce(lg.astype(np.float64)))
    want = 0.75 * p
    want[7] += 0.25
    assert np.allclose(np.exp(out.astype(np.float64)), want, rtol=1e-5, atol=1e-9)
    assert abs(np.exp(out.astype(np.float64)).sum() - 1) < 1e-5


@pytest.fixture(scope="module")
def ngram():
    rng = np.random.default_rng(0)
    rows = [(PROMPT, tuple([10, 11, 12] + rng.integers(100, 140, size=30).tolist() + [2])) for _ in range(40)]
    return train_ngram(rows, order=3)


def test_session_mixes_the_inner_model_exactly(ngram):
    m = M.MatchModel(ngram)
    hist = [7, 8, 9, 100, 7, 8]  # "7 8" occurred before, followed by 9 (match length 2)
    s, inner = m.session(PROMPT + tuple(hist)), ngram.session(PROMPT + tuple(hist))
    f, fi = s.frequencies(), inner.frequencies()
    assert np.array_equal(f, M.mix_frequencies(fi, 9, M.WEIGHTS[M.bucket(2)]))
    assert int(f[9]) > int(fi[9]) + M.WEIGHTS[0] * 2**16 - VOCAB_SIZE
    s.feed(55)  # "8 55" never occurred: the inner table alone
    inner.feed(55)
    assert np.array_equal(s.frequencies(), inner.frequencies())
    assert s.length == inner.length


def test_fingerprint_and_spec(ngram, tmp_path):
    m = M.MatchModel(ngram)
    assert m.fingerprint != ngram.fingerprint and len(m.fingerprint) == 64
    assert m.info.spec == "match:" + ngram.info.spec
    path = tmp_path / "ng.npz"
    ngram.save(path)
    loaded = load_model(f"match:ngram:{path}")
    assert loaded.fingerprint == M.MatchModel(load_model(f"ngram:{path}")).fingerprint
    # `default` is already the shipped student mixed with the match model
    for bad in ("match:", "match:match:tiny-random", "match:default", f"match:ngram:{tmp_path}/missing.npz"):
        with pytest.raises(ConfigError):
            load_model(bad)


@pytest.mark.parametrize("codec", ["model", "coupled"])
def test_codec_roundtrip_on_repetitive_text(ngram, codec):
    m = M.MatchModel(ngram)
    tokens = [10, 11, 12] + [100, 101, 102, 103, 104] * 12 + [2]
    options = {"seed": 5, "temperature": 0.7} if codec == "coupled" else {}
    make = lambda: get_codec(codec, weak_model=m, **options)  # noqa: E731
    data = encode_stream(make(), tokens, PROMPT)
    assert decode_stream(make(), data, PROMPT) == tokens
    plain = encode_stream(get_codec(codec, weak_model=ngram, **options), tokens, PROMPT)
    assert len(data) < len(plain)  # the repeats are nearly free under the match model
    with pytest.raises(Exception):  # a decoder without the match model does not decode it
        decode_stream(get_codec(codec, weak_model=ngram, **options), data, PROMPT)
