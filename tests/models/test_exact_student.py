"""The exact student: integer tables that do not depend on threads, batch shape or the incremental split."""

import hashlib
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exfilguard.errors import ConfigError
from exfilguard.models import load_model
from exfilguard.models.exact_student import DEFAULT_EXACT_STUDENT, isqrt, load_exact_student, quantize_student
from exfilguard.models.student import DEFAULT_STUDENT, Student, StudentConfig, load_student, save_student

PROMPT = [1, 9690, 198, 4000]
tokens = st.lists(st.integers(0, 49151), min_size=1, max_size=12)


def _float_student(path, **overrides):
    cfg = StudentConfig(**{**StudentConfig.preset("tiny").__dict__, "n_layer": 2, **overrides})
    net = Student(cfg)
    net.init_weights(torch.Generator().manual_seed(3))
    with torch.no_grad():  # livelier than the 0.02 init, so the tables are not near-uniform
        for p in net.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    save_student(net, path)
    return path


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    d = tmp_path_factory.mktemp("exact")
    src = _float_student(d / "float.npz")
    quantize_student(src, d / "exact.npz", max_positions=128)
    return load_exact_student(d / "exact.npz"), load_student(src)


def test_tables_sum_to_2_pow_24(exact):
    m, _ = exact
    f = m.session(PROMPT).frequencies()
    assert f.dtype == np.uint32 and f.shape == (49152,)
    assert int(f.sum(dtype=np.int64)) == 1 << 24 and int(f.min()) >= 1
    assert int(f.max()) > 1 << 12  # not a flat table: the test model says something


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(tokens)
def test_incremental_equals_teacher_forced(exact, toks):
    m, _ = exact
    s = m.session(PROMPT)
    inc = []
    for t in toks:
        inc.append(s.frequencies().copy())
        s.feed(t)
    tf = m.score_frequencies(PROMPT, toks)
    assert np.array_equal(np.stack(inc), tf)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(tokens, min_size=2, max_size=6))
def test_batch_of_n_equals_batch_of_one(exact, batch):
    m, _ = exact
    pairs = [(PROMPT[: 1 + i % 4], toks) for i, toks in enumerate(batch)]
    together = m.score_frequencies_many(pairs)
    for (p, t), got in zip(pairs, together):
        assert np.array_equal(m.score_frequencies(p, t), got)


def test_prefix_fed_at_once_equals_one_at_a_time(exact):
    m, _ = exact
    a = m.session(PROMPT + [5, 6, 7])
    b = m.session(PROMPT[:1])
    for t in PROMPT[1:] + [5, 6, 7]:
        b.feed(t)
    assert np.array_equal(a.frequencies(), b.frequencies())
    assert np.array_equal(a.logits(), b.logits())


_THREAD_SCRIPT = """
import hashlib, sys, numpy as np
from exfilguard.models.exact_student import load_exact_student
m = load_exact_student(sys.argv[1])
rng = np.random.default_rng(0)
pairs = [([1, 9690, 198], [int(x) for x in rng.integers(0, 49152, 40)]) for _ in range(3)]
h = hashlib.sha256()
for f in m.score_frequencies_many(pairs):
    h.update(f.tobytes())
print(h.hexdigest())
"""


def test_tables_identical_for_1_and_2_threads(exact, tmp_path):
    """Separate processes, so the BLAS thread pools really differ."""
    m, _ = exact
    path = m.info.spec.removeprefix("exact:")
    outs = []
    for n in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}
        r = subprocess.run([sys.executable, "-c", _THREAD_SCRIPT, path], capture_output=True, text=True, env=env, check=True)
        outs.append(r.stdout.strip())
    assert len(outs[0]) == 64 and outs[0] == outs[1]


def test_exact_is_close_to_its_float_student(exact):
    m, f = exact
    toks = [17, 4000, 12, 99, 100, 7]
    le = m.score_fast(PROMPT, toks).astype(np.float64)
    lf = f.score_fast(PROMPT, toks).astype(np.float64)
    pe = np.exp(le - np.logaddexp.reduce(le, axis=1, keepdims=True))
    lpf = lf - np.logaddexp.reduce(lf, axis=1, keepdims=True)
    lpe = np.log(pe)
    kl = (pe * (lpe - lpf)).sum(axis=1)
    assert kl.max() < 0.05, kl


def test_bound_check_refuses_a_model_whose_products_are_not_exact(tmp_path):
    """d_ff = 1100: an int8 x int8 dot product over 1100 terms can reach 127*127*1100 > 2**24."""
    src = _float_student(tmp_path / "wide.npz", d_ff=1100)
    quantize_student(src, tmp_path / "wide_exact.npz", max_positions=64)
    with pytest.raises(ConfigError, match=r"blocks\.0\.down has a float32 product bound .* >= 2\*\*24"):
        load_exact_student(tmp_path / "wide_exact.npz")


def test_too_long_context_is_a_clear_error(exact):
    m, _ = exact
    with pytest.raises(ConfigError, match="exceeds its 128 positions"):
        m.session(list(range(1, 140)))


def test_bad_files_are_config_errors(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"nope")
    with pytest.raises(ConfigError, match="not an exfilguard exact student file"):
        load_model(f"exact:{junk}")
    with pytest.raises(ConfigError, match="unknown exact student format"):
        load_model(f"exact:{DEFAULT_STUDENT}")  # the float file is not an exact one


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, (1 << 62) - 1), min_size=1, max_size=20))
def test_isqrt_is_exact(ns):
    got = isqrt(np.array(ns, dtype=np.int64))
    assert [int(x) for x in got] == [math.isqrt(n) for n in ns]
    # Beyond 64 values isqrt takes its numpy path (a float guess fixed in integers): the same roots.
    many = np.array((ns * (65 // len(ns) + 1))[:65] + [n * n for n in range(0, 1 << 31, 1 << 25)] + [(1 << 62) - 1], dtype=np.int64)
    assert [int(x) for x in isqrt(many)] == [math.isqrt(int(n)) for n in many]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(-(1 << 54), 1 << 54), st.integers(-6, 70)), min_size=1, max_size=12))
def test_rshift_round_matches_python_integers_and_in_place(pairs):
    """round(v / 2**sh) half up (sh capped at 62), v * 2**-sh for sh <= 0: per row, as the layers
    call it, out of place and in place (both branches: all shifts >= 1, and some <= 0)."""
    from exfilguard.models.exact_student import _rshift_round, _rshift_round_into

    v = np.array([[p[0], -p[0]] for p in pairs], dtype=np.int64)
    sh = np.array([[p[1]] for p in pairs], dtype=np.int64)
    if (sh <= 0).any():  # a left shift must stay inside int64, as the model's bounds keep it
        v >>= 8
    want = [[(x + (1 << (min(k, 62) - 1))) >> min(k, 62) if k >= 1 else x << -k for x in row] for row, k in zip(v.tolist(), sh[:, 0].tolist())]
    assert _rshift_round(v, sh).tolist() == want
    inplace = v.copy()
    _rshift_round_into(inplace, sh)
    assert inplace.tolist() == want


@pytest.mark.skipif(not DEFAULT_EXACT_STUDENT.is_file(), reason="the shipped exact student is missing")
def test_default_is_the_exact_student_with_the_match_model():
    from exfilguard.models.match import MatchModel

    m = load_model("default")
    assert isinstance(m, MatchModel) and m.info.spec == "default"
    assert m.inner.info.spec.startswith("exact:")
    prompt = [1, 9690, 198, 4000, 4001, 4002, 4000, 4001]
    f = m.session(prompt).frequencies()
    assert f is not None and int(f.sum(dtype=np.int64)) == 1 << 24
    assert f[4002] == f.max()  # the match model's copy wins
    digest = hashlib.sha256(m.inner.session(prompt).frequencies().tobytes()).hexdigest()
    assert digest == hashlib.sha256(m.inner.score_frequencies(prompt[:1], prompt[1:] + [0])[-1].tobytes()).hexdigest()


def test_match_over_exact_batched_tables_equal_the_session(exact):
    from exfilguard.models.match import MatchModel

    m = MatchModel(exact[0])
    toks = [4000, 12, 9690, 198, 4000, 12, 9690, 5]
    s = m.session(PROMPT)
    inc = []
    for t in toks:
        inc.append(s.frequencies().copy())
        s.feed(t)
    assert np.array_equal(np.stack(inc), m.score_frequencies(PROMPT, toks))
    assert exact[1].score_frequencies(PROMPT, toks) is None  # a float model has no exact pass


# -- batching across sessions (the stepper), backends, chunked prompts


def _session_tables(m, prompt, toks):
    """Tables of one session fed token by token, alone."""
    s = m.session(prompt)
    out = []
    for t in toks:
        out.append(s.frequencies().copy())
        s.feed(t)
    return np.stack(out)


def test_concurrent_sessions_share_passes_and_keep_their_tables(exact):
    """Threads coding different streams get their tables from shared passes (fewer passes than
    rows), each table equal to the one its session computes alone."""
    import threading

    m, _ = exact
    rng = np.random.default_rng(5)
    work = [([1] + [int(x) for x in rng.integers(0, 49152, 1 + 3 * i)], [int(x) for x in rng.integers(0, 49152, 6 + i)]) for i in range(6)]
    alone = [_session_tables(m, p, t) for p, t in work]
    got: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(work))
    passes0, rows0 = m.stepper.passes, m.stepper.rows

    def run(i):
        p, toks = work[i]
        with m.stepper.active():
            start.wait()
            got[i] = _session_tables(m, p, toks)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(work)):
        assert np.array_equal(got[i], alone[i]), i
    assert m.stepper.rows - rows0 > m.stepper.passes - passes0  # passes were shared


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 9000), min_size=1, max_size=64))
def test_step_groups_cover_every_sequence_once_within_the_key_budget(starts):
    from exfilguard.models.exact_student import STEP_KEYS, _step_groups

    groups = _step_groups(starts, 256)
    assert sorted(i for g in groups for i in g) == list(range(len(starts)))
    for g in groups:
        assert len(g) == 1 or len(g) * (max(starts[i] for i in g) + 1) * 256 <= STEP_KEYS


@pytest.mark.parametrize("starts", [[0, 4, 37], [9, 9, 9], [50]])
def test_a_decoding_step_attends_for_all_sequences_as_each_alone(exact, starts):
    """`_attend_steps` (one new row per sequence, keys padded to the longest) gives `_attend`'s
    integers for each sequence, with unequal lengths (padding masked) and equal ones (none)."""
    from exfilguard.models.exact_student import I16, KVCache

    m, _ = exact
    c = m.config
    rng = np.random.default_rng(len(starts) + starts[-1])
    caches = []
    for st in starts:
        kc = KVCache(c.n_layer, c.n_head, m.hd)
        kc.reserve(st + 1)
        kc.k[:, :, : st + 1] = rng.integers(-I16, I16 + 1, (c.n_layer, c.n_head, st + 1, m.hd))
        kc.v[:, :, : st + 1] = rng.integers(-I16, I16 + 1, (c.n_layer, c.n_head, st + 1, m.hd))
        caches.append(kc)
    q = rng.integers(-I16, I16 + 1, (len(starts), c.n_head, m.hd)).astype(np.int64)
    for li in range(c.n_layer):
        got = m._attend_steps(q, caches, li, starts)
        for i, (kc, st) in enumerate(zip(caches, starts)):
            assert np.array_equal(got[i], m._attend(q[i : i + 1], kc.k[li], kc.v[li], st)[0]), (li, i)


def test_one_pass_for_many_sessions_equals_each_alone(exact):
    m, _ = exact
    prompts = [[1, 2, 3], [1], [1, 9690, 198, 4000, 4001], [7, 7]]
    sess = [m.session(p) for p in prompts]
    m._advance(sess)  # one pass: every session's prompt and its table
    for p, s in zip(prompts, sess):
        assert np.array_equal(s.frequencies(), m.session(p).frequencies())
    for s in sess:
        s.feed(11)
    m._advance(sess[::2])  # a pass over some of them; the others are computed alone on demand
    for p, s in zip(prompts, sess):
        assert np.array_equal(s.frequencies(), m.score_frequencies(p, [11, 0])[1])


def test_numpy_and_torch_products_give_the_same_tables(exact):
    m, _ = exact
    if m.matmul != "torch":
        pytest.skip("this torch has no CPU torch._int_mm")
    path = m.info.spec.removeprefix("exact:")
    n = load_exact_student(path, matmul="numpy")
    assert n.matmul == "numpy"
    toks = [17, 4000, 12, 99, 100, 7, 48000]
    assert np.array_equal(m.score_frequencies(PROMPT, toks), n.score_frequencies(PROMPT, toks))
    assert np.array_equal(m.score_logits(PROMPT, toks), n.score_logits(PROMPT, toks))


def test_long_prompts_are_read_in_chunks_with_the_same_integers(exact, monkeypatch):
    """Prompts read PREFILL_CHUNK tokens per pass and attention in blocks of ATT_ENTRIES scores
    give the tables of the one-token-at-a-time path (small limits, so this model hits them)."""
    import exfilguard.models.exact_student as es

    m, _ = exact
    rng = np.random.default_rng(9)
    prompt = [1] + [int(x) for x in rng.integers(0, 49152, 90)]
    toks = [int(x) for x in rng.integers(0, 49152, 20)]
    ref = _session_tables(m, prompt[:1], prompt[1:] + toks)[len(prompt) - 1 :]
    monkeypatch.setattr(es, "PREFILL_CHUNK", 7)
    monkeypatch.setattr(es, "ATT_ENTRIES", 3 * 4 * 50)  # blocks of ~3 queries over ~50 keys
    assert np.array_equal(_session_tables(m, prompt, toks), ref)
    assert np.array_equal(m.score_frequencies(prompt, toks), ref)
    assert [f.shape for f in m.score_frequencies_many([(prompt, toks), (prompt[:5], toks[:3])])] == [ref.shape, (3, 49152)]


def test_a_bad_token_is_refused_when_fed_not_in_a_shared_pass(exact):
    m, _ = exact
    s = m.session(PROMPT)
    with pytest.raises(ValueError, match="outside the student's vocabulary"):
        s.feed(49152)
    with pytest.raises(ValueError, match="outside the student's vocabulary"):
        m.session([1, -1])
    assert int(s.frequencies().sum(dtype=np.int64)) == 1 << 24  # the session is unharmed


def test_kv_cache_grows_linearly(exact):
    m, _ = exact
    s = m.session(PROMPT)
    for t in range(100):
        s.feed(t)
    s.frequencies()
    assert s.cache.length == len(PROMPT) + 100
    assert s.cache.k.dtype == np.int16 and s.cache.k.shape[2] < 2 * s.cache.length


def test_threads_that_wake_during_a_pass_do_not_corrupt_it(exact, monkeypatch):
    """Waiting threads wake every 0.1 ms (GATHER_S) while passes run: none may see its table (and
    feed its session again) before the pass that computes it is over, or a session would be read
    twice in one pass and its cache go wrong."""
    import threading

    import exfilguard.models.exact_student as es

    m, _ = exact
    monkeypatch.setattr(es, "GATHER_S", 0.0001)
    old_switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the GIL changes hands often, as under load
    rng = np.random.default_rng(11)
    work = [([1, 2 + i], [int(x) for x in rng.integers(0, 49152, 40)]) for i in range(12)]
    alone = [_session_tables(m, p, t) for p, t in work]
    got: dict[int, np.ndarray] = {}

    def run(i):
        p, toks = work[i]
        with m.stepper.active():
            got[i] = _session_tables(m, p, toks)

    try:
        for _ in range(4):  # a race: several rounds make it show on broken code
            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(np.array_equal(got[i], alone[i]) for i in range(len(work)))
    finally:
        sys.setswitchinterval(old_switch)


def test_at_most_coding_slots_threads_code_between_passes(exact, monkeypatch):
    """Between two table requests a thread codes (Python, under the GIL); the stepper lets
    CODING_SLOTS of them do so at once and parks the others, which still get their tables from
    shared passes, equal to each alone. Threads that enter their region and wait for each other
    first (the inside's barrier) do not hold a slot, so they cannot block each other."""
    import threading

    import exfilguard.models.exact_student as es

    m, _ = exact
    monkeypatch.setattr(es, "CODING_SLOTS", 1)
    monkeypatch.setattr(m, "stepper", es.Stepper(m))
    rng = np.random.default_rng(12)
    work = [([1, 5 + i], [int(x) for x in rng.integers(0, 49152, 12)]) for i in range(8)]
    alone = [_session_tables(m, p, t) for p, t in work]
    got: dict[int, np.ndarray] = {}
    coding, most = [0], [0]
    count = threading.Lock()
    barrier = threading.Barrier(len(work))

    def run(i):
        p, toks = work[i]
        with m.stepper.active():
            barrier.wait(10)
            s = m.session(p)
            rows = []
            for t in toks:
                rows.append(s.frequencies().copy())  # waits for a pass; holds a slot after it
                with count:
                    coding[0] += 1
                    most[0] = max(most[0], coding[0])
                time.sleep(0.002)  # coding: another thread with a slot would overlap here
                with count:
                    coding[0] -= 1
                s.feed(t)
            got[i] = np.stack(rows)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert all(np.array_equal(got[i], alone[i]) for i in range(len(work)))
    assert most[0] == 1
    assert m.stepper.rows > m.stepper.passes  # passes were still shared


def test_usable_cpus_reads_a_cgroup_quota(tmp_path):
    import exfilguard.models.exact_student as es

    own = len(os.sched_getaffinity(0))
    cases = {"max 100000\n": own, "200000 100000\n": min(own, 2), "50000 100000\n": 1, "250000 100000\n": min(own, 3), "garbage\n": own}
    for text, want in cases.items():
        f = tmp_path / "cpu.max"
        f.write_text(text)
        assert es.usable_cpus(str(f)) == want, text
    assert es.usable_cpus(str(tmp_path / "missing")) == own
