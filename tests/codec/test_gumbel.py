"""Counter-based Gumbel noise and the seeded sampler: pinned bits, exactness, seed errors."""

from __future__ import annotations

import decimal

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exfilguard.codec import gumbel
from exfilguard.codec.gumbel import (
    G_FRAC,
    PositionNoise,
    MAX_SEED,
    gumbel_fixed,
    gumbel_noise,
    gumbel_of_bits,
    ln_fixed,
    sample_token,
    tempered_logprobs,
    uniform_bits,
    uniform_noise,
    validate_seed,
)
from exfilguard.errors import RequestInvalid


def test_pinned_bits() -> None:
    # Changing these breaks every stored seed's reproduction (and verification): never do it.
    assert [int(v) for v in uniform_bits(1, 0, 4)] == [
        0x1CDB33CDD5A123E6,
        0x014CC23BA6E5A655,
        0xB3E93F1A49D44B19,
        0xC1DAE85C467425E2,
    ]
    assert [int(v) for v in uniform_bits(MAX_SEED, 7, 2)] == [0x697A05729B1FCC8C, 0x9F387BE2F3B7F937]
    np.testing.assert_allclose(gumbel_noise(1, 0, 3), [-0.780631599638213, -1.6644822343341223, 1.0420963362527584], rtol=1e-12)
    # The integer noise itself: the same on every machine (no libm), pinned like the bits.
    assert [int(v) for v in gumbel_fixed(1, 0, 4)] == [-219728261327768, -468510098144498, 293324041977002, 360258481787180]
    assert [int(v) for v in gumbel_fixed(MAX_SEED, 12345, 3)] == [245681020211011, 759211431781327, -4690049861692]


_CTX = decimal.Context(prec=60)


def _ref_gumbel(x: int) -> decimal.Decimal:
    u = _CTX.divide(decimal.Decimal(2 * x + 1), decimal.Decimal(2**54))
    return -_CTX.ln(-_CTX.ln(u))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 2**62 - 1), min_size=1, max_size=30))
def test_fixed_point_log_is_within_2_pow_minus_44(ns) -> None:
    got = ln_fixed(np.array(ns, dtype=np.int64))
    for n, g in zip(ns, got):
        assert abs(_CTX.ln(decimal.Decimal(n)) * 2**G_FRAC - int(g)) < 2**4


EDGES = [0, 1, 2, 2**52, 2**53 - 1, 2**53 - 2, 2**53 - 2**43 - 1, 2**53 - 2**43, 2**53 - 2**43 + 1, 2**53 - 2**20]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 2**53 - 1), st.integers(2**53 - 2**45, 2**53 - 1), st.sampled_from(EDGES)), min_size=1, max_size=30))
def test_integer_gumbel_is_within_2_pow_minus_36(xs) -> None:
    """Both branches (and their border at U = 1 - 2**-10) against a 60-digit decimal reference."""
    got = gumbel_of_bits(np.array(xs, dtype=np.int64))
    for x, g in zip(xs, got):
        assert abs(_ref_gumbel(x) * 2**G_FRAC - int(g)) < 2 ** (G_FRAC - 36), x


def test_prefix_stable_and_positions_independent() -> None:
    # The first k values do not depend on the vocabulary size asked for.
    assert np.array_equal(uniform_bits(9, 3, 10), uniform_bits(9, 3, 1000)[:10])
    # Neighbouring positions share no counter blocks (no shifted copies).
    a, b = uniform_bits(9, 3, 4096), uniform_bits(9, 4, 4096)
    assert not np.intersect1d(a, b).size
    assert not np.array_equal(uniform_bits(9, 3, 8), uniform_bits(10, 3, 8))


def test_uniform_range_and_gumbel_moments() -> None:
    u = uniform_noise(5, 0, 200_000)
    assert 0.0 < u.min() and u.max() < 1.0
    g = gumbel_noise(5, 1, 200_000)
    assert abs(g.mean() - np.euler_gamma) < 0.01
    assert abs(g.var() - np.pi**2 / 6) < 0.03
    # Tail: P(G > 3) = 1 - exp(-exp(-3)).
    assert abs((g > 3).mean() - (1 - np.exp(-np.exp(-3)))) < 0.002


@pytest.mark.parametrize("bad", [-1, MAX_SEED + 1, 1.5, "7", None, True, 2**70])
def test_bad_seeds(bad: object) -> None:
    with pytest.raises(RequestInvalid) as exc:
        validate_seed(bad)
    assert exc.value.param == "seed"
    assert "seed" in str(exc.value)
    with pytest.raises(RequestInvalid):
        sample_token(np.zeros(4, dtype=np.float32), 1.0, 1.0, bad, 0)  # type: ignore[arg-type]


def test_good_seeds() -> None:
    assert validate_seed(0) == 0
    assert validate_seed(MAX_SEED) == MAX_SEED
    assert validate_seed(np.uint64(3)) == 3


def test_greedy_ties_lowest_id() -> None:
    logits = np.array([0.0, 3.0, 1.0, 3.0], dtype=np.float32)
    assert all(sample_token(logits, 0.0, 1.0, s, 0) == 1 for s in range(20))


def test_top_p_nucleus() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    lp = tempered_logprobs(logits, 1.0, 0.8)
    assert np.isfinite(lp[:2]).all() and np.isneginf(lp[2:]).all()
    seen = {sample_token(logits, 1.0, 0.8, s, p) for s in range(50) for p in range(4)}
    assert seen == {0, 1}


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness-of-fit p-value (torch's regularized gamma; no scipy)."""
    counts = np.asarray(counts, dtype=np.float64)
    expected = np.asarray(probs, dtype=np.float64) / np.sum(probs) * counts.sum()
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = counts.size - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def test_chi2_pvalue_matches_reference() -> None:
    # scipy.stats.chisquare([30, 20, 50], [25, 25, 50]).pvalue
    assert abs(chi2_pvalue(np.array([30, 20, 50]), np.array([0.25, 0.25, 0.5])) - 0.36787944117144233) < 1e-9


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.9)])
def test_sampler_matches_distribution(temperature: float, top_p: float) -> None:
    """Chi-square: seeded Gumbel-max draws follow softmax(logits / T) within the nucleus."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, size=12).astype(np.float32)
    p = np.exp(tempered_logprobs(logits, temperature, top_p))
    counts = np.zeros(12)
    for seed in range(400):
        for pos in range(10):
            counts[sample_token(logits, temperature, top_p, seed * 7919 + 11, pos)] += 1
    support = p > 0
    assert counts[~support].sum() == 0
    assert chi2_pvalue(counts[support], p[support]) > 1e-3


# --- The fast path: the exact path's decisions, bit for bit -----------------------------------


def _decisions(scores: np.ndarray, grid: int) -> tuple[int, np.ndarray]:
    return int(np.argmax(scores)), np.floor(scores * grid)


def test_this_machines_log_takes_the_fast_path() -> None:
    # Otherwise the tests below compare the exact path with itself.
    assert gumbel._approx_ok()
    n = PositionNoise(3, 4, 49_152)
    assert n.fast
    assert np.abs(n.approx - gumbel_noise(3, 4, 49_152)).max() <= gumbel.APPROX_BOUND / 16


@settings(max_examples=60, deadline=None)
@given(st.integers(0, MAX_SEED), st.integers(0, 10_000), st.sampled_from([0.3, 0.7, 1.0, 1.7]), st.integers(0, 2**32 - 1))
def test_perturb_makes_the_exact_decisions(seed: int, position: int, temperature: float, rng_seed: int) -> None:
    rng = np.random.default_rng(rng_seed)
    vocab = 4096
    row = (rng.normal(0, 3, vocab)).astype(np.float32).astype(np.float64)
    exact = row + temperature * gumbel_noise(seed, position, vocab)
    fast = PositionNoise(seed, position, vocab).perturb(row, temperature, 16)
    a, fa = _decisions(exact, 16)
    b, fb = _decisions(fast, 16)
    assert a == b and np.array_equal(fa, fb)
    assert np.abs(fast - exact).max() <= 2 * temperature * gumbel.APPROX_BOUND
    assert fast[a] == exact[a]  # the winner's value is the exact path's float


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_perturb_on_grid_lines_and_near_ties(temperature: float) -> None:
    """Rows built so that the exact scores sit on grid lines, or a hair apart at the top: the
    approximation alone would decide these wrongly; the fast path must not."""
    vocab, seed, pos = 2048, 99, 5
    g = gumbel_noise(seed, pos, vocab)
    rng = np.random.default_rng(1)
    k = rng.integers(-64, 64, vocab)
    # On (or one ulp around) a grid line: exact score = k/16 + tiny.
    tiny = rng.choice([-1e-13, 0.0, 1e-13, -3e-11, 3e-11], vocab)
    row = k / 16 + tiny - temperature * g
    # A near-tie at the top, closer than the approximation's error could resolve.
    row[[10, 700, 1500]] = 20.0 - temperature * g[[10, 700, 1500]] + np.array([0.0, 2e-12, -2e-12])
    exact = row + temperature * g
    fast = PositionNoise(seed, pos, vocab).perturb(row, temperature, 16)
    a, fa = _decisions(exact, 16)
    b, fb = _decisions(fast, 16)
    assert a == b == 700
    assert np.array_equal(fa, fb)


def test_fast_sampler_equals_the_exact_reference() -> None:
    rng = np.random.default_rng(2)
    for i in range(40):
        logits = rng.normal(0, 2.5, 3000).astype(np.float32)
        t, top_p = [(0.7, 1.0), (1.0, 0.9), (1.3, 1.0)][i % 3]
        ref = int(np.argmax(tempered_logprobs(logits, t, top_p) + gumbel_noise(i, i * 3, logits.size)))
        assert sample_token(logits, t, top_p, i, i * 3) == ref


def test_a_bad_log_falls_back_to_the_integers(monkeypatch) -> None:
    good = gumbel._approx_of_bits
    monkeypatch.setattr(gumbel, "_approx_of_bits", lambda x: good(x) + 1e-9)  # a log off by 1e-9
    gumbel._approx_ok.cache_clear()
    try:
        assert not gumbel._approx_ok()
        n = PositionNoise(7, 1, 1000)
        assert not n.fast
        assert np.array_equal(n.perturb(np.zeros(1000), 0.7, 16), 0.7 * gumbel_noise(7, 1, 1000))
    finally:
        monkeypatch.undo()
        gumbel._approx_ok.cache_clear()


def test_cached_noise_is_shared_read_only_and_validated() -> None:
    a = gumbel.position_noise(5, 9, 1000)
    assert gumbel.position_noise(5, 9, 1000) is a  # the sampler's draw serves the encoder
    with pytest.raises(ValueError):
        a.approx[0] = 0.0  # shared between threads: nobody may change it
    with pytest.raises(RequestInvalid):
        gumbel.position_noise([5], 9, 1000)  # type: ignore[arg-type]
