"""The wire protocol: round trips, strictness, and a fuzz target for the outside's parser."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exfilguard.errors import FrameCorrupt, RequestInvalid
from exfilguard.protocol.wire import (
    DATA_IMPLIED,
    FailCode,
    FrameReader,
    GenerationRequest,
    Hello,
    Kind,
    encode_frame,
    data_cut,
    encode_varint,
    parse_resend,
)

UP = [Kind.DATA, Kind.END, Kind.FAIL, Kind.RESEND]


@given(st.lists(st.tuples(st.sampled_from(UP), st.integers(0, 4095), st.binary(min_size=1, max_size=300)), max_size=20),
       st.integers(1, 50))
def test_round_trip_any_split(frames, step):
    data = b"".join(encode_frame(k, s, p if k != Kind.FAIL else p[:1]) for k, s, p in frames)
    r = FrameReader("upstream")
    got = []
    for i in range(0, len(data), step):
        got += r.feed(data[i : i + step])
    assert [(f.kind, f.slot, f.payload) for f in got] == [(k, s, p if k != Kind.FAIL else p[:1]) for k, s, p in frames]
    assert r.pending == 0


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_fuzz_upstream_parser_never_crashes(data):
    r = FrameReader("upstream")
    try:
        for f in r.feed(data):
            assert f.kind in (Kind.HELLO, Kind.DATA, Kind.END, Kind.FAIL, Kind.RESEND)
    except FrameCorrupt:
        pass


def test_frame_overhead_is_small():
    # one-flush answer: header byte + length byte
    assert len(encode_frame(Kind.END, 3, b"x" * 100)) == 102
    assert len(encode_frame(Kind.END, 15, b"x" * 1000)) == 1003


def test_rejects_wrong_direction_and_garbage():
    # Upstream, kind numbers 5-7 are DATA frames of implied length (protocol v2), so only the
    # downstream reader has a kind to refuse.
    with pytest.raises(FrameCorrupt):
        FrameReader("downstream").feed(encode_frame(Kind.DATA, 1, b"x"))
    with pytest.raises(FrameCorrupt):  # over-long varint
        FrameReader("upstream").feed(b"\xff\xff\xff\xff\xff\xff")
    with pytest.raises(FrameCorrupt):  # empty DATA
        FrameReader("upstream").feed(encode_varint(1 << 3 | 1) + b"\x00")
    with pytest.raises(FrameCorrupt):  # DATA longer than the limit
        FrameReader("upstream").feed(encode_varint(1 << 3 | 1) + encode_varint((1 << 20) + 1))
    with pytest.raises(FrameCorrupt):  # HELLO on slot 1
        FrameReader("upstream").feed(encode_varint(1 << 3 | 0) + b"\x01x")


def test_hello_and_resend():
    h = Hello(1, "smollm2", "ab" * 8)
    assert Hello.from_bytes(h.to_bytes()) == h
    assert len(h.to_bytes()) < 50
    with pytest.raises(FrameCorrupt):
        Hello.from_bytes(b'{"v":1}')
    assert parse_resend(encode_varint(300) + b"raw") == (300, b"raw")
    assert FailCode(encode_frame(Kind.FAIL, 0, bytes([2]))[-1]) == FailCode.BAD_REQUEST


def test_request_validation():
    r = GenerationRequest([1, 2, 3], 16, 7, 0.7, 0.9, ["\n\n"], "model", 8, 50.0)
    assert GenerationRequest.from_bytes(r.to_bytes(), 49152) == r
    for bad in (b"[]", b"{", b'{"prompt_ids":[],"max_tokens":1,"seed":0}',
                b'{"prompt_ids":[99999999],"max_tokens":1,"seed":0}',
                b'{"prompt_ids":[1],"max_tokens":0,"seed":0}',
                b'{"prompt_ids":[1],"max_tokens":1,"seed":0,"temperature":9}',
                b'{"prompt_ids":[1],"max_tokens":1,"seed":0,"stop":[1]}'):
        with pytest.raises(RequestInvalid):
            GenerationRequest.from_bytes(bad, 49152)


@given(st.lists(st.tuples(st.integers(0, 4095), st.binary(min_size=1, max_size=14)), max_size=20), st.integers(1, 9))
def test_data_frames_of_implied_length_round_trip(frames, step):
    """DATA of 4, 6 or 8 bytes has no length field; the reader gives Kind.DATA back for all."""
    data = b"".join(encode_frame(Kind.DATA, s, p) for s, p in frames)
    r = FrameReader("upstream")
    got = []
    for i in range(0, len(data), step):
        got += r.feed(data[i : i + step])
    assert [(f.kind, f.slot, f.payload) for f in got] == [(Kind.DATA, s, p) for s, p in frames]
    for s, p in frames:
        head = len(encode_varint(s << 3))
        assert len(encode_frame(Kind.DATA, s, p)) == head + len(p) + (0 if len(p) in DATA_IMPLIED.values() else 1)


def test_data_cut_holds_back_at_most_four_bytes():
    for n in range(40):
        k = data_cut(n)
        assert 0 <= n - k <= 4 and (k == n or k in DATA_IMPLIED.values())
        later = data_cut(n, first=False)
        assert later == (k if n >= 4 else 0)
    assert [data_cut(n) for n in range(13)] == [0, 1, 2, 3, 4, 4, 6, 6, 8, 8, 8, 8, 8]
