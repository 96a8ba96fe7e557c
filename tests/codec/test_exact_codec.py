"""The codecs over an exact weak model: the integer table coded as it is, teacher-forced encoding safe."""

import numpy as np
import pytest
import torch
from fakes import own_samples

from exfilguard.codec import Encoder, decode_stream, encode_stream, get_codec
from exfilguard.models.exact_student import load_exact_student, quantize_student
from exfilguard.models.match import MatchModel
from exfilguard.models.student import Student, StudentConfig, save_student

PROMPT = [1, 9690, 198, 4000]


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    d = tmp_path_factory.mktemp("exactcodec")
    net = Student(StudentConfig(d_model=32, n_layer=1, n_head=2, d_ff=64))
    net.init_weights(torch.Generator().manual_seed(5))
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    save_student(net, d / "f.npz")
    quantize_student(d / "f.npz", d / "e.npz", max_positions=256)
    return load_exact_student(d / "e.npz")


@pytest.mark.parametrize("wrap", [False, True])
def test_teacher_forced_encoder_gives_the_incremental_bytes(exact, wrap):
    model = MatchModel(exact) if wrap else exact
    toks = own_samples(model, PROMPT, 40, seed=1)
    inc = encode_stream(get_codec("model", weak_model=model), toks, PROMPT, flush_every=8)
    tf_codec = get_codec("model", weak_model=model, teacher_forced=True)
    tf = encode_stream(tf_codec, toks, PROMPT, flush_every=8)
    assert tf == inc
    assert decode_stream(get_codec("model", weak_model=model), tf, PROMPT) == toks
    enc = Encoder(tf_codec, PROMPT)
    assert enc._state._use_teacher_forced()  # the batched path really ran (not the fallback)


def test_model_codec_codes_the_exact_table(exact):
    """Cost of the stream = the table's ideal bits, plus a few bytes of framing."""
    toks = own_samples(exact, PROMPT, 60, seed=2)
    data = encode_stream(get_codec("model", weak_model=exact), toks, PROMPT)
    f = exact.score_frequencies(PROMPT, toks)
    ideal = float((24 - np.log2(f[np.arange(len(toks)), toks].astype(np.float64))).sum())
    assert 8 * len(data) <= ideal * 1.01 + 96


def test_coupled_teacher_forced_matches_incremental(exact):
    toks = own_samples(exact, PROMPT, 30, seed=3)
    c_inc = get_codec("coupled", weak_model=exact).for_request(7, 0.7)
    c_tf = get_codec("coupled", weak_model=exact, teacher_forced=True).for_request(7, 0.7)
    a = encode_stream(c_inc, toks, PROMPT, flush_every=10)
    b = encode_stream(c_tf, toks, PROMPT, flush_every=10)
    assert a == b
    assert decode_stream(get_codec("coupled", weak_model=exact).for_request(7, 0.7), b, PROMPT) == toks


def test_protocol_factory_encoder_may_run_batched_for_exact_models(exact):
    """The inside's codec factory passes teacher_forced through; for an exact model it really runs batched."""
    from exfilguard.protocol.codec_adapter import RealCodecFactory

    f = RealCodecFactory(MatchModel(exact), {"model": {"teacher_forced": True}, "coupled": {"teacher_forced": True}})
    for name in ("model", "coupled"):
        c = f.codec(name)
        c = c.for_request(3, 0.7) if hasattr(c, "for_request") else c
        assert c.teacher_forced is True
        assert Encoder(c, PROMPT)._state._use_teacher_forced()
    assert RealCodecFactory(exact).codec("model").teacher_forced is False  # opt-in
