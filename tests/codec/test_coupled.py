"""The coupled codec: round trips, exact sampling, determinism, seed errors, corruption."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gumbel import chi2_pvalue

from exfilguard.codec import codec_ids, get_codec
from exfilguard.codec.coupled import COUPLED_CODEC_ID, CoupledCodec, coupled_scores, position_levels
from exfilguard.codec.gumbel import sample_token, tempered_logprobs
from exfilguard.codec.stream import Decoder, Encoder, decode_stream, encode_stream
from exfilguard.errors import ConfigError, Desync, FrameCorrupt, ModelMismatch, RequestInvalid
from exfilguard.models.base import LanguageModel, ModelInfo, Session

PROMPT = [1, 17, 42]


@pytest.fixture(scope="module")
def tiny_model() -> LanguageModel:
    from exfilguard.models.specs import load_model

    return load_model("tiny-random")


class _PairSession(Session):
    def __init__(self, m: "PairModel", prefix: Sequence[int]):
        self.m, self.ctx = m, list(prefix)

    def logits(self) -> np.ndarray:
        return self.m.row(self.ctx)

    def feed(self, token_id: int) -> None:
        self.ctx.append(int(token_id))

    @property
    def length(self) -> int:
        return len(self.ctx)


class PairModel(LanguageModel):
    """Synthetic strong/weak pair: the strong logits are the weak ones plus `eps` Gaussian noise
    (per context), so KL(strong || weak) is set by eps. `jitter` adds per-call float noise."""

    def __init__(self, vocab: int, eps: float, strong: bool, sharp: float = 2.5, jitter: float = 0.0):
        self.vocab, self.eps, self.strong, self.sharp, self.jitter = vocab, eps, strong, sharp, jitter
        self._calls = 0
        fp = hashlib.sha256(f"pair:{vocab}:{eps}:{strong}:{sharp}".encode()).hexdigest()
        self.info = ModelInfo(spec="pair", fingerprint=fp, vocab_size=vocab, eos_token_ids=(2,))

    def row(self, ctx: Sequence[int]) -> np.ndarray:
        h = int.from_bytes(hashlib.sha256(str(list(ctx)[-2:]).encode()).digest()[:8], "little")
        rng = np.random.default_rng(h)
        base = rng.standard_normal(self.vocab) * self.sharp
        if self.strong:
            base = base + rng.standard_normal(self.vocab) * self.eps
        out = base.astype(np.float32)
        if self.jitter:
            self._calls += 1
            out = out + np.random.default_rng(self._calls).standard_normal(self.vocab).astype(np.float32) * np.float32(self.jitter)
        return out

    def session(self, prefix_ids: Sequence[int]) -> _PairSession:
        return _PairSession(self, prefix_ids)


def generate(strong: LanguageModel, n: int, temperature: float, seed: int, top_p: float = 1.0) -> list[int]:
    sess = strong.session(PROMPT)
    out = []
    for pos in range(n):
        tok = sample_token(sess.logits(), temperature, top_p, seed, pos)
        out.append(tok)
        sess.feed(tok)
    return out


# ------------------------------------------------------------------ round trips


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    vocab=st.integers(3, 400),
    eps=st.sampled_from([0.0, 0.2, 1.0, 4.0]),
    temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.5]),
    top_p=st.sampled_from([1.0, 0.9]),
    seed=st.integers(0, (1 << 64) - 1),
    n=st.integers(0, 40),
    flush=st.sampled_from([None, 1, 7]),
    tau=st.sampled_from([None, 0, 7]),
)
def test_roundtrip_property(vocab: int, eps: float, temperature: float, top_p: float, seed: int, n: int, flush: int | None, tau: int | None) -> None:
    strong, weak = PairModel(vocab, eps, True), PairModel(vocab, eps, False)
    toks = generate(strong, n, temperature, seed, top_p)
    codec = CoupledCodec(weak, tau=tau).for_request(seed, temperature, top_p)
    data = encode_stream(codec, toks, PROMPT, flush_every=flush)
    assert decode_stream(CoupledCodec(weak).for_request(seed, temperature, top_p), data, PROMPT) == toks


@settings(max_examples=30, deadline=None)
@given(tokens=st.lists(st.integers(0, 299), max_size=30), seed=st.integers(0, 1000), temperature=st.sampled_from([0.0, 0.7, 1.0]))
def test_roundtrip_any_tokens(tokens: list[int], seed: int, temperature: float) -> None:
    """Tokens the weak model finds absurd (escape, stage 2) still round-trip."""
    weak = PairModel(300, 0.0, False)
    codec = CoupledCodec(weak).for_request(seed, temperature)
    assert decode_stream(codec, encode_stream(codec, tokens, PROMPT, flush_every=5), PROMPT) == tokens


def test_agreement_is_cheap() -> None:
    """Weak == strong: every token is the perturbed argmax and costs a fraction of a bit."""
    m = PairModel(2000, 0.0, False)
    toks = generate(m, 200, 1.0, 7)
    codec = CoupledCodec(m).for_request(7, 1.0)
    data = encode_stream(codec, toks, PROMPT)
    assert codec.stats.agreements == 200
    model_bits = 8 * len(encode_stream(get_codec("model", m), toks, PROMPT))
    assert 8 * len(data) < 0.1 * model_bits
    assert 8 * len(data) < 0.05 * 200 + 80  # fixed framing ~ 10 bytes


def test_coupled_beats_model_codec_when_close() -> None:
    strong, weak = PairModel(3000, 0.3, True), PairModel(3000, 0.3, False)
    cb = mb = 0
    for seed in range(3):
        toks = generate(strong, 100, 1.0, seed)
        cb += len(encode_stream(CoupledCodec(weak).for_request(seed, 1.0), toks, PROMPT))
        mb += len(encode_stream(get_codec("model", weak), toks, PROMPT))
    assert cb < 0.5 * mb


# ------------------------------------------------------------------ exact sampling


def test_chi_square_tiny_random(tiny_model: LanguageModel) -> None:
    """Seeded Gumbel-max draws from tiny-random's next-token distribution (many seeds) match it:
    chi-square over 16 bins of equal probability mass."""
    logits = tiny_model.session([1, 9690, 198]).logits()
    t = 0.5
    p = np.exp(tempered_logprobs(logits, t))
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    bins = np.zeros(p.size, dtype=np.int64)
    bins[order] = np.minimum((cum - p[order] / 2) * 16, 15).astype(np.int64)
    mass = np.bincount(bins, weights=p, minlength=16)
    counts = np.zeros(16)
    for seed in range(3000):
        counts[bins[sample_token(logits, t, 1.0, seed * 2654435761 % (1 << 64), seed % 5)]] += 1
    used = mass > 0  # a token heavier than 1/16 spans several bins; it sits in one
    assert counts[~used].sum() == 0 and used.sum() >= 6
    assert chi2_pvalue(counts[used], mass[used]) > 1e-3


def test_chi_square_sequences_through_codec() -> None:
    """Two-token sequences sampled with many seeds and coded/decoded by the coupled codec
    follow the strong model's joint distribution (the codec never changes what is sampled)."""
    strong, weak = PairModel(4, 0.8, True, sharp=1.0), PairModel(4, 0.8, False, sharp=1.0)
    joint = np.zeros((4, 4))
    p0 = np.exp(tempered_logprobs(strong.row(PROMPT), 1.0))
    for a in range(4):
        joint[a] = p0[a] * np.exp(tempered_logprobs(strong.row(PROMPT + [a]), 1.0))
    counts = np.zeros((4, 4))
    for seed in range(1600):
        toks = generate(strong, 2, 1.0, seed)
        codec = CoupledCodec(weak).for_request(seed, 1.0)
        assert decode_stream(codec, encode_stream(codec, toks, PROMPT), PROMPT) == toks
        counts[toks[0], toks[1]] += 1
    assert chi2_pvalue(counts.ravel(), joint.ravel()) > 1e-3


# ------------------------------------------------------------------ determinism

_DETERMINISM_SCRIPT = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from exfilguard.models.specs import load_model
from exfilguard.codec.gumbel import sample_token
from exfilguard.codec.coupled import CoupledCodec
from exfilguard.codec.stream import encode_stream
m = load_model("tiny-random")
prompt = [1, 9690, 198, 2683]
out = {}
for seed, t in ((5, 1.0), (6, 0.7), (7, 0.0)):
    s = m.session(prompt); toks = []
    for pos in range(20):
        tok = sample_token(s.logits(), t, 1.0, seed, pos); toks.append(tok); s.feed(tok)
    out[f"{seed}"] = [toks, encode_stream(CoupledCodec(m).for_request(seed, t), toks, prompt).hex()]
print(json.dumps(out))
"""


def test_determinism_across_processes_and_threads() -> None:
    """Same (prompt, seed, weights): the same tokens and the same coupled bytes, whether torch
    runs 1 or 2 threads, in separate processes."""
    env = dict(os.environ, PYTHONHASHSEED="random")
    procs = [
        subprocess.Popen([sys.executable, "-c", _DETERMINISM_SCRIPT, str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        for n in (1, 2)
    ]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1]


def test_same_seed_same_tokens_different_seed_differs() -> None:
    strong = PairModel(500, 0.0, True)
    assert generate(strong, 30, 1.0, 3) == generate(strong, 30, 1.0, 3)
    assert generate(strong, 30, 1.0, 3) != generate(strong, 30, 1.0, 4)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 5000), st.sampled_from([0.5, 0.7, 1.0]))
def test_coupled_scores_levels_are_the_exact_noises(seed: int, pos: int, temperature: float) -> None:
    """The fast noise (PositionNoise) gives the coded levels the integer noise gives, bit for bit."""
    from exfilguard.codec.gumbel import gumbel_noise

    row = (np.random.default_rng(seed % 997).standard_normal(8000) * 3).astype(np.float32)
    fast = position_levels(coupled_scores(row, temperature, seed, pos))
    exact = position_levels(row.astype(np.float64) + temperature * gumbel_noise(seed, pos, row.size))
    assert np.array_equal(fast.ids, exact.ids) and np.array_equal(fast.d, exact.d)


def _levels_reference(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """position_levels' (ids, d) as first written: every entry snapped, a stable sort of all."""
    from exfilguard.codec.coupled import KMAX, TAUS, depth_levels

    q = np.floor(np.clip(s, -1e6, 1e6) * 16).astype(np.int64)
    top = int(q.max())
    ids = np.flatnonzero(q >= top - depth_levels(len(TAUS) - 1))
    d = top - q[ids]
    order = np.argsort(d, kind="stable")[:KMAX]
    ids, d = ids[order], d[order]
    best = int(np.argmax(s))
    if best not in ids:  # a top cell holding more than KMAX entries: the argmax takes the last place
        ids, d = np.append(ids[:-1], best), np.append(d[:-1], 0)
    at = int(np.flatnonzero(ids == best)[0])
    return np.concatenate(([best], np.delete(ids, at))), np.concatenate(([d[at]], np.delete(d, at)))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.01, 1.0, 3.0, 30.0]), st.sampled_from([0.0, 40.0, -40.0, 1e5]))
def test_position_levels_equal_the_reference(seed: int, spread: float, shift: float) -> None:
    """The window-first snapping gives the levels of snapping every entry."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal(6000) * spread + shift
    s[rng.integers(0, 6000, 50)] = np.round(s[:50] * 16) / 16  # on grid lines
    got = position_levels(s)
    ids, d = _levels_reference(s)
    assert np.array_equal(got.ids, ids) and np.array_equal(got.d, d)


def test_coupled_scores_levels_stable_under_float_noise() -> None:
    """Noise of 1e-5 in the weak logits changes a position's coded levels only rarely."""
    rng = np.random.default_rng(0)
    changed = 0
    for pos in range(200):
        row = (rng.standard_normal(5000) * 3).astype(np.float32)
        noisy = row + (rng.standard_normal(5000) * 1e-5).astype(np.float32)
        a = position_levels(coupled_scores(row, 0.7, 11, pos))
        b = position_levels(coupled_scores(noisy, 0.7, 11, pos))
        changed += not (np.array_equal(a.ids[:16], b.ids[:16]) and np.array_equal(a.d[:16], b.d[:16]))
    assert changed <= 4


def test_float_noise_desync_is_caught_and_resend_recovers() -> None:
    """Decoder logits jittered by 3e-4: every chunk either verifies or raises Desync, and the
    raw resend gives the exact tokens."""
    strong, weak = PairModel(1000, 0.5, True), PairModel(1000, 0.5, False)
    noisy = PairModel(1000, 0.5, False, jitter=3e-4)
    for seed in range(4):
        toks = generate(strong, 60, 1.0, seed)
        enc = Encoder(CoupledCodec(weak).for_request(seed, 1.0), PROMPT, flush_every=8)
        data = enc.push_many(toks) + enc.finish()
        dec = Decoder(CoupledCodec(noisy).for_request(seed, 1.0), PROMPT)
        got: list[int] = []
        try:
            got += dec.feed(data)
        except Desync as exc:
            idx = exc.chunk_index
            while True:
                try:
                    got += dec.resend(idx, enc.raw_chunk(idx))
                    break
                except Desync as again:
                    idx = again.chunk_index
        assert dec.finish() == toks


# ------------------------------------------------------------------ seeds and errors


@pytest.mark.parametrize("bad", [None, -1, 1 << 64, 1.5, "12", True])
def test_missing_or_malformed_seed(bad: object) -> None:
    with pytest.raises(RequestInvalid) as exc:
        CoupledCodec(PairModel(10, 0.0, False)).for_request(bad, 1.0)
    assert exc.value.param == "seed"


def test_unbound_codec_refuses_streams() -> None:
    with pytest.raises(RequestInvalid, match="seed"):
        encode_stream(CoupledCodec(PairModel(10, 0.0, False)), [1, 2], PROMPT)


def test_registry() -> None:
    weak = PairModel(10, 0.0, False)
    c = get_codec("coupled", weak)
    assert isinstance(c, CoupledCodec) and c.codec_id == COUPLED_CODEC_ID
    assert codec_ids()[COUPLED_CODEC_ID] is True
    with pytest.raises(ConfigError):
        get_codec("coupled")


def test_wrong_seed_is_detected() -> None:
    strong, weak = PairModel(300, 0.3, True), PairModel(300, 0.3, False)
    toks = generate(strong, 40, 1.0, 1)
    data = encode_stream(CoupledCodec(weak).for_request(1, 1.0), toks, PROMPT)
    with pytest.raises(FrameCorrupt):
        decode_stream(CoupledCodec(weak).for_request(2, 1.0), data, PROMPT)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_corrupted_stream_detected(data: st.DataObject) -> None:
    """A flipped, dropped or appended byte is rejected (FrameCorrupt, Desync included) or,
    where the change is immaterial, decodes to the very same tokens: never to other tokens."""
    strong, weak = PairModel(300, 0.3, True), PairModel(300, 0.3, False)
    toks = generate(strong, 30, 0.7, 9)
    codec = CoupledCodec(weak).for_request(9, 0.7)
    stream = bytearray(encode_stream(codec, toks, PROMPT, flush_every=data.draw(st.sampled_from([None, 10]))))
    kind = data.draw(st.sampled_from(["flip", "drop", "append"]))
    i = data.draw(st.integers(0, len(stream) - 1))
    if kind == "flip":
        stream[i] ^= data.draw(st.integers(1, 255))
    elif kind == "drop":
        del stream[i]
    else:
        stream += bytes([data.draw(st.integers(0, 255))])
    try:
        got = decode_stream(CoupledCodec(weak).for_request(9, 0.7), bytes(stream), PROMPT)
    except (FrameCorrupt, ModelMismatch):  # a damaged header can name another weak model
        return
    assert got == toks


# ------------------------------------------------------------------ bench


def test_bench_json_plumbing(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [1, 9690, 198]}) + "\n" + json.dumps({"prompt_ids": [1, 4093, 198]}) + "\n")
    exe = Path(sys.executable).with_name("exfilguard")
    out = subprocess.run(
        [str(exe), "bench", "coupled", "--strong", "tiny-random", "--weak", "tiny-random", "--prompts", str(prompts),
         "--limit", "2", "--max-tokens", "6", "--temperature", "1.0", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(r) == {"tokens", "codecs", "kl_bits_per_token", "cross_entropy_bits_per_token", "agreement"}
    assert r["tokens"] == 12
    for name in ("model", "coupled"):
        assert r["codecs"][name]["roundtrip_ok"] is True
        assert r["codecs"][name]["bits_per_token"] > 0
    assert abs(r["kl_bits_per_token"]) < 1e-6  # weak == strong


def test_roundtrip_weak_model_with_exact_frequencies() -> None:
    """An n-gram-like weak model (exact integer table): the PLAIN mode uses that table."""
    from fakes import FakeModel

    weak = FakeModel(vocab=300, exact=True)
    strong = PairModel(300, 0.0, True)
    for seed, t in ((1, 0.7), (2, 1.0), (3, 0.0)):
        toks = generate(strong, 30, t, seed)
        for tau in (None, 7):
            codec = CoupledCodec(weak, tau=tau).for_request(seed, t)
            assert decode_stream(codec, encode_stream(codec, toks, [1, 2, 3], flush_every=9), [1, 2, 3]) == toks


# ------------------------------------------------------------------ mixture tables


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    vocab=st.integers(2, 3000),
    sharp=st.floats(0.1, 8.0),
    temperature=st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.5]),
    exact=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
)
def test_mix_tables_are_exact_distributions(vocab: int, sharp: float, temperature: float, exact: bool, seed: int) -> None:
    """Every mode's table totals exactly 2**24, gives every listed token >= 1, lists no token
    twice, and prices every token at most a hair above each of its two mixture components."""
    from exfilguard.codec import quantizer as Q
    from exfilguard.codec.coupled import LAMBDAS, PLAIN, _stage1_weights, coupled_scores, mode_dist

    rng = np.random.default_rng(seed % 2**32)
    logits = (rng.standard_normal(vocab) * sharp).astype(np.float32)
    plain = logits if temperature <= 0 else logits / np.float32(temperature)
    freqs = (rng.integers(1, 5000, vocab)).astype(np.int64) if exact else None
    pos = position_levels(coupled_scores(logits, temperature, seed, 3), plain, freqs)
    for mode in range(PLAIN + 1):
        d = mode_dist(pos, mode)
        assert d.order.size == np.unique(d.order).size
        assert (d.weights >= 0).all() and d.escape >= 0
        assert int(d.weights.sum()) + d.order.size + d.escape + 1 == Q.TOTAL
        if mode < PLAIN:
            assert d.position(int(pos.ids[0])) == 0  # the weak model's guess is coded first
            lam = LAMBDAS[mode] / 256
            k, w1 = _stage1_weights(pos, mode)
            pd = pos.plain_dist
            for slot in range(min(k, 5)):
                tok = int(pos.ids[slot])
                r1 = (int(w1[slot]) + 1) / Q.TOTAL
                bound = min(-np.log2(lam * r1), -np.log2(1 - lam) + pd.cost_bits(tok))
                assert d.cost_bits(tok) <= bound + 0.01


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    vocab=st.integers(2, 3000),
    sharp=st.floats(0.1, 8.0),
    temperature=st.sampled_from([0.0, 0.7, 1.0]),
    exact=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
)
def test_token_cost_bits_is_what_the_tables_charge(vocab: int, sharp: float, temperature: float, exact: bool, seed: int) -> None:
    """The encoder's per-token price in every mode (computed without building the tables) equals
    the built table's price: candidates, plain-only tokens and tail tokens."""
    from exfilguard.codec.coupled import PLAIN, mode_dist, token_cost_bits

    rng = np.random.default_rng(seed % 2**32)
    logits = (rng.standard_normal(vocab) * sharp).astype(np.float32)
    plain = logits if temperature <= 0 else logits / np.float32(temperature)
    freqs = (rng.integers(1, 5000, vocab)).astype(np.int64) if exact else None
    pos = position_levels(coupled_scores(logits, temperature, seed, 3), plain, freqs)
    tails = np.setdiff1d(np.arange(vocab), pos.plain_dist.order)
    toks = {int(pos.ids[0]), int(pos.ids[-1]), int(np.argmin(logits)), *map(int, rng.integers(0, vocab, 4)), *map(int, tails[:3])}
    for tok in toks:
        want = [mode_dist(pos, m).cost_bits(tok) for m in range(PLAIN + 1)]
        assert token_cost_bits(pos, tok).tolist() == want


@pytest.mark.parametrize("exact", [False, True])
def test_teacher_forced_encoder_roundtrips(tiny_model: LanguageModel, exact: bool) -> None:
    """The inside's batched encoder against the outside's incremental decoder: a real model
    (tiny-random: score_fast and the KV path differ in the last bits) and an exact-table model
    (the encoder must use the table, as the decoder does)."""
    from fakes import FakeModel

    m = FakeModel(vocab=700, exact=True) if exact else tiny_model
    toks = [int(x) for x in np.random.default_rng(5).integers(3, m.vocab_size, 40)]
    for temperature in (0.0, 0.7, 1.0):
        enc = CoupledCodec(m, teacher_forced=True).for_request(77, temperature)
        dec = CoupledCodec(m).for_request(77, temperature)
        e = Encoder(enc, PROMPT, flush_every=16)
        data = e.push_many(toks) + e.finish()
        d = Decoder(dec, PROMPT)
        try:
            d.feed(data)
        except Desync as exc:  # float differences between the two paths: the resend repairs it
            i = exc.chunk_index
            while True:
                try:
                    d.resend(i, e.raw_chunk(i))
                    break
                except Desync as again:
                    i = again.chunk_index
        assert d.finish() == toks
        if exact:
            assert data == encode_stream(CoupledCodec(m).for_request(77, temperature), toks, PROMPT, flush_every=16)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6000), st.integers(0, 50))
def test_first_by_depth_equals_a_full_stable_sort(seed, n, levels):
    """The partition shortcut keeps exactly the first KMAX entries of a stable sort by depth (ties by id)."""
    from exfilguard.codec.coupled import KMAX, _first_by_depth

    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(49152, size=n, replace=False)).astype(np.int64)
    d = rng.integers(0, levels + 1, size=n).astype(np.int64)
    order = np.argsort(d, kind="stable")
    got_ids, got_d = _first_by_depth(ids, d.copy())
    assert np.array_equal(got_ids, ids[order][:KMAX]) and np.array_equal(got_d, d[order][:KMAX])
