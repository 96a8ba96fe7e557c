"""Encoder/Decoder roundtrips for every codec, bad input, corruption, fuzzing, raw resend."""

import json

import numpy as np
import pytest
from fakes import FakeModel
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from exfilguard.codec import Decoder, Encoder, decode_stream, encode_stream, get_codec
from exfilguard.errors import ConfigError, Desync, FrameCorrupt, ModelMismatch

PROMPT = [1, 9690, 198]
VOCAB = 300
MODEL = FakeModel(vocab=VOCAB)
fast = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

token_lists = st.lists(st.integers(0, VOCAB - 1), max_size=60)
flushes = st.one_of(st.none(), st.integers(1, 20))


def codec(name, model=MODEL, **kw):
    return get_codec(name, weak_model=model, **kw)


def sample(model, n, seed=0, temperature=1.0):
    """Tokens drawn from the fake model itself (what a weak model codes cheaply)."""
    rng = np.random.default_rng(seed)
    s = model.session(PROMPT)
    out = []
    for _ in range(n):
        logit = s.logits().astype(np.float64)
        if temperature == 0:
            t = int(np.argmax(logit))
        else:
            p = np.exp((logit - logit.max()) / temperature)
            t = int(rng.choice(logit.size, p=p / p.sum()))
        out.append(t)
        s.feed(t)
    return out


@fast
@given(token_lists, flushes, st.integers(0, 2**40), st.sampled_from(["raw", "zstd-ids", "model"]))
def test_roundtrip_random_tokens(tokens, flush, sid, name):
    c = codec(name)
    data = encode_stream(c, tokens, PROMPT, stream_id=sid, flush_every=flush)
    assert decode_stream(c, data, PROMPT, stream_id=sid) == tokens


@fast
@given(st.integers(0, 2**32 - 1), st.integers(50, 3000), st.floats(0.3, 8), flushes, st.booleans())
def test_roundtrip_random_distributions(seed, vocab, sharp, flush, exact):
    """Random weak models (logits or exact integer tables), tokens sampled from them."""
    m = FakeModel(vocab=vocab, seed=seed % 1000, sharp=sharp, exact=exact)
    tokens = sample(m, 40, seed)
    c = codec("model", m)
    data = encode_stream(c, tokens, PROMPT, flush_every=flush)
    assert decode_stream(c, data, PROMPT) == tokens


@pytest.mark.parametrize("tau", [None, 0, 7])
def test_model_codec_is_cheap_on_its_own_samples(tau):
    m = FakeModel(vocab=2000, sharp=4)
    tokens = sample(m, 200, temperature=0 if tau == 7 else 1.0)
    data = encode_stream(codec("model", m, tau=tau), tokens, PROMPT)
    raw = encode_stream(codec("raw"), tokens, PROMPT)
    assert decode_stream(codec("model", m, tau=tau), data, PROMPT) == tokens
    assert len(data) < len(raw) / 2


def test_teacher_forced_encoder_roundtrips():
    m = FakeModel(vocab=1000)
    tokens = sample(m, 50)
    data = encode_stream(codec("model", m, teacher_forced=True), tokens, PROMPT, flush_every=16)
    assert decode_stream(codec("model", m), data, PROMPT) == tokens


def test_teacher_forced_encoder_with_exact_table_model_uses_the_table():
    """An n-gram-like weak model: teacher forcing would code under its float logits while the
    decoder codes under its exact table; the encoder must fall back to the table."""
    m = FakeModel(vocab=500, exact=True)
    tokens = sample(m, 40)
    data = encode_stream(codec("model", m, teacher_forced=True), tokens, PROMPT, flush_every=8)
    assert decode_stream(codec("model", m), data, PROMPT) == tokens
    assert data == encode_stream(codec("model", m), tokens, PROMPT, flush_every=8)


@pytest.mark.parametrize("name", ["zstd", "zstd-dict"])
def test_zstd_text_roundtrip_or_desync(name, dev_corpus):
    """Text codecs: every corpus row decodes to the same ids or is reported, never wrong."""
    rows = [json.loads(line) for line in dev_corpus.open()][:40]
    c = codec(name)
    ok = 0
    for r in rows:
        data = encode_stream(c, r["token_ids"], r["prompt_ids"])
        try:
            ok += decode_stream(c, data, r["prompt_ids"]) == r["token_ids"]
        except Desync:
            pass
    assert ok >= 20


def test_streaming_decoder_yields_per_chunk():
    tokens = list(range(25))
    enc = Encoder(codec("raw"), PROMPT, stream_id=3, flush_every=10)
    dec = Decoder(codec("raw"), PROMPT, stream_id=3)
    got = []
    for t in tokens:
        for b in enc.push(t):
            got += dec.feed(bytes([b]))  # byte by byte
    assert got == tokens[:20] and not dec.done
    got += dec.feed(enc.finish())
    assert got == tokens and dec.done and dec.finish() == tokens


# ------------------------------------------------------------------ bad input


def _model_stream(tokens=None, flush=None, sid=1):
    tokens = tokens if tokens is not None else sample(MODEL, 30)
    return tokens, encode_stream(codec("model"), tokens, PROMPT, stream_id=sid, flush_every=flush)


def test_bad_magic():
    _, data = _model_stream()
    with pytest.raises(FrameCorrupt, match="not an exfilguard"):
        decode_stream(codec("model"), b"\x00" + data[1:], PROMPT)


def test_wrong_codec():
    _, data = _model_stream()
    with pytest.raises(FrameCorrupt, match="expects 'raw'"):
        decode_stream(codec("raw"), data, PROMPT)


def test_truncation():
    _, data = _model_stream(flush=7)
    for cut in range(len(data)):
        with pytest.raises(FrameCorrupt):
            decode_stream(codec("model"), data[:cut], PROMPT)


def test_trailing_garbage():
    _, data = _model_stream()
    with pytest.raises(FrameCorrupt, match="after the end"):
        decode_stream(codec("model"), data + b"\x00", PROMPT)


def test_crc_mismatch():
    tokens, data = _model_stream(sample(MODEL, 30), sid=1)
    raw = encode_stream(codec("raw"), tokens, PROMPT)
    bad = bytearray(raw)
    bad[-1] ^= 1  # last byte of the CRC-32
    with pytest.raises(FrameCorrupt):
        decode_stream(codec("raw"), bytes(bad), PROMPT)


def test_fingerprint_mismatch_names_both():
    _, data = _model_stream()
    other = FakeModel(vocab=VOCAB, fingerprint="ffff" + "0" * 60)
    with pytest.raises(ModelMismatch) as exc:
        decode_stream(codec("model", other), data, PROMPT)
    msg = str(exc.value)
    assert other.fingerprint in msg and MODEL.fingerprint[:4] in msg


def test_stream_id_mismatch():
    _, data = _model_stream(sid=5)
    with pytest.raises(FrameCorrupt, match="stream id 5"):
        decode_stream(codec("model"), data, PROMPT, stream_id=6)


def test_unknown_codec_name():
    with pytest.raises(ConfigError, match="unknown codec"):
        get_codec("lz4")
    with pytest.raises(ConfigError, match="weak model"):
        get_codec("model")


def test_out_of_vocab_token_refused():
    with pytest.raises(ValueError):
        encode_stream(codec("model"), [VOCAB + 5], PROMPT)


# ------------------------------------------------------------------ corruption, fuzz


@pytest.mark.parametrize("name,flush", [("raw", None), ("raw", 4), ("zstd-ids", 5), ("model", None), ("model", 6)])
def test_every_single_byte_change_is_detected(name, flush):
    tokens = sample(MODEL, 20, seed=4)
    c = codec(name)
    data = encode_stream(c, tokens, PROMPT, stream_id=300, flush_every=flush)
    rng = np.random.default_rng(0)
    for i in range(len(data)):
        for v in {data[i] ^ 0xFF, data[i] ^ 1, int(rng.integers(256))} - {data[i]}:
            bad = data[:i] + bytes([v]) + data[i + 1 :]
            try:
                out = decode_stream(c, bad, PROMPT, stream_id=300)
            except FrameCorrupt:  # includes Desync and ModelMismatch's parent check
                continue
            except ModelMismatch:
                continue
            assert out == tokens, f"byte {i} -> {v:#x} decoded to different tokens"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=80), st.sampled_from(["raw", "zstd-ids", "model", "zstd"]))
def test_fuzz_parser_never_crashes(data, name):
    c = codec(name)
    for blob in (data, bytes([0xA0 | c.codec_id]) + data, bytes([0xA0 | c.codec_id]) + MODEL.fingerprint[:4].encode() + data):
        try:
            decode_stream(c, blob, PROMPT)
        except (FrameCorrupt, ModelMismatch):
            pass


edits = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=4)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token_lists, st.sampled_from(["raw", "model"]), flushes, edits)
# Found by this fuzzer on a fresh clone: constriction raised a bare AssertionError.
@example([0], "model", None, [("insert", 4, 128), ("insert", 4, 162)])
def test_fuzz_mutated_streams_never_yield_wrong_tokens(tokens, name, flush, ops):
    c = codec(name)
    stream = bytearray(encode_stream(c, tokens, PROMPT, flush_every=flush))
    for op, at, value in ops:
        i = at % max(len(stream), 1)
        if op == "flip" and stream:
            stream[i] ^= value or 0xFF
        elif op == "insert":
            stream.insert(i, value)
        elif stream:
            del stream[i]
    try:
        out = decode_stream(c, bytes(stream), PROMPT)
    except (FrameCorrupt, ModelMismatch):
        return
    assert out == tokens


def test_range_decoder_garbage_is_frame_corrupt():
    """The fuzzer's find: two bytes inserted into a one-token model stream give a Desync, not AssertionError."""
    c = codec("model")
    stream = bytearray(encode_stream(c, [0], PROMPT))
    stream.insert(4, 128)
    stream.insert(4, 162)
    with pytest.raises(FrameCorrupt):
        decode_stream(c, bytes(stream), PROMPT)


# ------------------------------------------------------------------ desync and raw resend


def _decode_with_resends(enc, dec, data):
    got = []
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
    return got, dec.finish()


def test_noisy_decoder_recovers_with_raw_resend():
    """A decoder whose weak-model logits are perturbed desyncs on some chunks; a raw resend of
    just those chunks resynchronises and the stream decodes to the exact tokens."""
    tokens = sample(MODEL, 120, seed=9)
    enc = Encoder(codec("model"), PROMPT, flush_every=10)
    data = enc.push_many(tokens) + enc.finish()
    noisy = FakeModel(vocab=VOCAB, noise=0.05)  # same fingerprint, perturbed logits
    dec = Decoder(codec("model", noisy), PROMPT)
    got, final = _decode_with_resends(enc, dec, data)
    assert final == tokens and got == tokens
    assert 0 < dec.resends < len(enc.chunks)  # some chunks desynced, not all


def test_tiny_noise_does_not_desync():
    """Noise of the measured CPU size (1e-5 on logits) leaves the streams decodable."""
    tokens = sample(FakeModel(vocab=3000), 100, seed=2)
    m = FakeModel(vocab=3000)
    data = encode_stream(codec("model", m), tokens, PROMPT, flush_every=25)
    noisy = FakeModel(vocab=3000, noise=1e-5)
    assert decode_stream(codec("model", noisy), data, PROMPT) == tokens


def test_resend_must_match_check():
    tokens = sample(MODEL, 30, seed=1)
    enc = Encoder(codec("model"), PROMPT, flush_every=10)
    data = enc.push_many(tokens) + enc.finish()
    dec = Decoder(codec("model", FakeModel(vocab=VOCAB, noise=1.0)), PROMPT)
    with pytest.raises(Desync) as exc:
        dec.feed(data)
    i = exc.value.chunk_index
    from exfilguard.codec.frame import raw_resend

    with pytest.raises(FrameCorrupt):
        dec.resend(i, raw_resend(i, [t ^ 1 for t in enc.chunks[i]]))
