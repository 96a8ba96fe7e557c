"""The student transformer: incremental path, file format, specs, the shipped default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exfilguard.models import load_model
from exfilguard.models.student import DEFAULT_STUDENT, Student, StudentConfig, load_student, save_student

TINY = StudentConfig.preset("tiny")


def _net(seed: int = 0) -> Student:
    net = Student(TINY)
    net.init_weights(torch.Generator().manual_seed(seed))
    return net


def test_init_is_deterministic():
    a, b = _net(1).state_dict(), _net(1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.weight"], _net(2).state_dict()["embed.weight"])


def test_save_load_roundtrip_and_spec(tmp_path):
    path = tmp_path / "s.npz"
    save_student(_net(), path)
    m = load_student(path)
    m2 = load_model(f"student:{path}")
    assert m.fingerprint == m2.fingerprint and m2.info.spec == f"student:{path}"
    assert m.info.vocab_size == 49152 and m.info.eos_token_ids == (2,)
    save_student(_net(3), tmp_path / "t.npz")
    assert load_student(tmp_path / "t.npz").fingerprint != m.fingerprint


def test_incremental_path_matches_batched_pass(tmp_path):
    path = tmp_path / "s.npz"
    save_student(_net(), path)
    m = load_student(path)
    prefix, toks = [1, 9690, 198, 42], [7, 8, 9, 10, 11]
    inc = m.score(prefix, toks)
    fast = m.score_fast(prefix, toks)
    assert inc.dtype == np.float32 and inc.shape == (5, 49152)
    np.testing.assert_allclose(inc, fast, atol=1e-4)
    # The same path twice gives the same bits.
    assert np.array_equal(inc, m.score(prefix, toks))


def test_unknown_file_is_a_config_error(tmp_path):
    from exfilguard.errors import ConfigError

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ConfigError):
        load_student(bad)


@pytest.mark.skipif(not DEFAULT_STUDENT.is_file(), reason="the shipped student is missing")
def test_default_float_spec_is_the_shipped_student_with_the_match_model():
    from exfilguard.models.match import MatchModel

    m = load_model("default-float")
    bare = load_model(f"student:{DEFAULT_STUDENT}")
    assert m.info.spec == "default-float" and isinstance(m, MatchModel)
    assert m.fingerprint == MatchModel(bare).fingerprint != bare.fingerprint
    assert m.inner.net.num_params() > 5_000_000
    # "a b c a b" predicts "c": the mixture lifts it above what the bare student gives it
    prompt = [1, 9690, 198, 4000, 4001, 4002, 4000, 4001]
    lg, lb = m.session(prompt).logits(), bare.session(prompt).logits()
    assert lg.shape == (49152,) and np.isfinite(lg).all()
    p, pb = (np.exp(x - np.logaddexp.reduce(x.astype(np.float64))) for x in (lg, lb))
    assert p[4002] > pb[4002] and p[4002] >= 0.18
