"""Stream format v2: one progressive range coder per answer (exact weak-model tables)."""

import numpy as np
import pytest
from fakes import FakeModel, own_samples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exfilguard.codec import Decoder, Encoder, decode_stream, encode_stream, get_codec
from exfilguard.codec.frame import MAGIC_V2
from exfilguard.errors import FrameCorrupt

PROMPT = [1, 9690, 198]
VOCAB = 300
EXACT = FakeModel(vocab=VOCAB, exact=True)
FLOAT = FakeModel(vocab=VOCAB)
fast = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
token_lists = st.lists(st.integers(0, VOCAB - 1), max_size=50)


def codec(name, model=EXACT, seed=7, temperature=0.7, **kw):
    c = get_codec(name, weak_model=model, **kw)
    return c.for_request(seed, temperature) if name == "coupled" else c


def progressive(c, tokens, flush_points, deliver=None, stream_id=0):
    """Encode with flushes after the given token counts; feed each flush's bytes (split by
    `deliver` if given); return (stream bytes, tokens per feed, tokens from close)."""
    enc = Encoder(c, PROMPT, stream_id=stream_id)
    dec = Decoder(c, PROMPT, stream_id=stream_id)
    parts, got = [], []
    for i, t in enumerate(tokens):
        enc.push(t)
        if i + 1 in flush_points:
            b = enc.flush()
            parts.append(b)
            for j in range(0, len(b), deliver or max(len(b), 1)):
                got.append(dec.feed(b[j : j + (deliver or len(b))]))
    b = enc.finish()
    parts.append(b)
    got.append(dec.feed(b))
    return b"".join(parts), got, dec.close()


@fast
@given(token_lists, st.sets(st.integers(1, 50)), st.sampled_from(["model", "coupled"]), st.integers(1, 5))
def test_roundtrip_and_every_token_fed_out_is_right(tokens, flushes, name, deliver):
    c = codec(name)
    data, got, rest = progressive(c, tokens, flushes, deliver)
    assert data[0] == MAGIC_V2 | c.codec_id
    fed = [t for g in got for t in g]
    assert fed + rest == tokens
    assert decode_stream(c, data, PROMPT) == tokens


@fast
@given(token_lists, st.sets(st.integers(1, 50)))
def test_flushes_cost_nothing(tokens, flushes):
    """The model codec over an exact table: the stream is the same bytes wherever it flushed."""
    c = codec("model")
    data, _, _ = progressive(c, tokens, flushes)
    assert data == encode_stream(c, tokens, PROMPT)


def test_a_flush_lets_the_decoder_show_nearly_every_token():
    tokens = own_samples(EXACT, PROMPT, 160, seed=3)
    c = codec("model")
    enc, dec = Encoder(c, PROMPT), Decoder(c, PROMPT)
    shown = 0
    for i, t in enumerate(tokens):
        enc.push(t)
        if (i + 1) % 16 == 0:
            shown += len(dec.feed(enc.flush()))
            assert shown >= i + 1 - 4, f"after {i + 1} tokens only {shown} determined"
    shown += len(dec.feed(enc.finish()))
    assert shown + len(dec.close()) == len(tokens)


@pytest.mark.parametrize("name", ["model", "coupled"])
def test_fixed_cost_is_under_64_bits(name):
    """Header, END, check and seal: the stream stays within 64 bits of the tables' ideal cost."""
    c = codec(name)
    for seed in range(5):
        tokens = own_samples(EXACT, PROMPT, 120, seed=seed)
        enc = Encoder(c, PROMPT)
        ideal = 0.0
        state = c.new_state(PROMPT)
        for t in tokens:
            d = state.row_dist(state.next_row(), 0)
            ideal += d.cost_bits(t)
            state.accept(t)
        data = enc.push_many(tokens) + enc.finish()
        if name == "model":
            assert 8 * len(data) <= ideal + 64, (seed, 8 * len(data), ideal)
        assert decode_stream(c, data, PROMPT) == tokens


def test_float_tables_keep_format_v1_and_v1_still_decodes():
    tokens = own_samples(EXACT, PROMPT, 30)
    assert encode_stream(codec("model", FLOAT), tokens, PROMPT)[0] >> 4 == 0xA
    enc = Encoder(codec("model"), PROMPT, version=1, flush_every=8)
    data = enc.push_many(tokens) + enc.finish()
    assert data[0] >> 4 == 0xA and decode_stream(codec("model"), data, PROMPT) == tokens


# ------------------------------------------------------------------ truncation, corruption


def _stream(name="model", n=40, seed=1, sid=0):
    c = codec(name)
    tokens = own_samples(EXACT, PROMPT, n, seed=seed)
    return c, tokens, encode_stream(c, tokens, PROMPT, stream_id=sid)


@pytest.mark.parametrize("name", ["model", "coupled"])
def test_truncation_is_frame_corrupt_and_never_a_wrong_token(name):
    c, tokens, data = _stream(name)
    for cut in range(len(data)):
        dec = Decoder(c, PROMPT)
        shown = dec.feed(data[:cut])
        assert shown == tokens[: len(shown)]
        with pytest.raises(FrameCorrupt):
            dec.close()


@pytest.mark.parametrize("name", ["model", "coupled"])
def test_every_single_byte_change_is_frame_corrupt(name):
    c, tokens, data = _stream(name, n=25)
    rng = np.random.default_rng(0)
    for i in range(len(data)):
        for v in {data[i] ^ 0xFF, data[i] ^ 1, int(rng.integers(256))} - {data[i]}:
            with pytest.raises(FrameCorrupt):
                decode_stream(c, data[:i] + bytes([v]) + data[i + 1 :], PROMPT)


def test_trailing_bytes_are_frame_corrupt():
    c, _, data = _stream()
    for extra in (b"\x00", b"\x01", b"\xff\xff"):
        with pytest.raises(FrameCorrupt):
            decode_stream(c, data + extra, PROMPT)


def test_other_model_prompt_or_stream_fails_the_check():
    c, tokens, data = _stream(sid=5)
    assert decode_stream(c, data, PROMPT, stream_id=5) == tokens
    with pytest.raises(FrameCorrupt):
        decode_stream(c, data, PROMPT, stream_id=6)
    with pytest.raises(FrameCorrupt):
        decode_stream(c, data, PROMPT + [5], stream_id=5)
    other = FakeModel(vocab=VOCAB, exact=True, fingerprint="ab" * 32)  # same tables, other name
    with pytest.raises(FrameCorrupt):
        decode_stream(codec("model", other), data, PROMPT, stream_id=5)


def test_wrong_codec_header():
    _, _, data = _stream()
    with pytest.raises(FrameCorrupt, match="expects 'coupled'"):
        decode_stream(codec("coupled"), data, PROMPT)


def test_v2_has_no_raw_resend():
    enc = Encoder(codec("model"), PROMPT, flush_every=4)
    enc.push_many(own_samples(EXACT, PROMPT, 10))
    with pytest.raises(ValueError, match="no chunks"):
        enc.raw_chunk(0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=60), st.sampled_from(["model", "coupled"]), st.booleans())
def test_fuzz_parser_only_frame_corrupt(data, name, whole):
    """Bytes from the other side of the cap: FrameCorrupt or (with odds 2**-32) a checked
    stream; never another exception, and it stops (truncation guard, token limit)."""
    c = codec(name)
    blob = bytes([MAGIC_V2 | c.codec_id]) + data
    dec = Decoder(c, PROMPT)
    try:
        if whole:
            dec.feed(blob)
        else:
            for i in range(len(blob)):
                dec.feed(blob[i : i + 1])
        dec.close()
    except FrameCorrupt:
        return


edits = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token_lists, st.sampled_from(["model", "coupled"]), edits)
def test_fuzz_mutated_streams_never_decode_to_other_tokens(tokens, name, ops):
    c = codec(name)
    stream = bytearray(encode_stream(c, tokens, PROMPT))
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
    except FrameCorrupt:
        return
    assert out == tokens


def test_protocol_adapter_hands_out_every_token_once():
    """The inside/outside adapters: push/flush/finish on one side, push/finish on the other;
    the tokens only the end determines come from finish()."""
    from exfilguard.protocol.codec_adapter import RealCodecFactory

    f = RealCodecFactory(EXACT)
    tokens = own_samples(EXACT, PROMPT, 70, seed=5)
    for name in ("model", "coupled"):
        for every in (1, 16):  # a flush per token (a time budget on slow tokens), per 16 tokens
            enc = f.encoder(name, PROMPT, 11, 0.7, 1.0)
            dec = f.decoder(name, PROMPT, 11, 0.7, 1.0)
            got, sizes = [], []
            for i, t in enumerate(tokens):
                enc.push(t)
                if i % every == every - 1:
                    data = enc.flush()
                    sizes.append(len(data))
                    if data:
                        got += dec.push(data)
            got += dec.push(enc.finish())
            got += dec.finish()
            assert got == tokens
            later = [n for n in sizes[sizes.index(next(n for n in sizes if n)) + 1 :] if n]
            assert all(n >= 4 for n in later)  # after the first frame, no 1-3 byte frames


@pytest.mark.parametrize("name", ["raw", "zstd-ids"])
def test_v2_header_for_a_v1_only_codec_is_frame_corrupt(name):
    c = get_codec(name)
    with pytest.raises(FrameCorrupt, match="only has format v1"):
        decode_stream(c, bytes([MAGIC_V2 | c.codec_id, 1, 2, 3]), PROMPT)


@pytest.mark.parametrize("name", ["model", "coupled"])
def test_headerless_v2_between_two_sides_that_agree(name):
    """header=False on both sides: one byte less, same tokens; v1 codecs keep their header."""
    c = codec(name)
    tokens = own_samples(EXACT, PROMPT, 30, seed=2)
    enc = Encoder(c, PROMPT, header=False)
    data = enc.push_many(tokens) + enc.finish()
    assert data == encode_stream(c, tokens, PROMPT)[1:]
    dec = Decoder(c, PROMPT, header=False)
    assert dec.feed(data) + dec.close() == tokens
    with pytest.raises(FrameCorrupt):  # a decoder that expects a header refuses it
        decode_stream(c, data, PROMPT)
    f = codec("model", FLOAT)
    enc = Encoder(f, PROMPT, header=False)
    data = enc.push_many(tokens) + enc.finish()
    assert data[0] >> 4 == 0xA
    dec = Decoder(f, PROMPT, header=False)
    dec.feed(data)
    assert dec.finish() == tokens
