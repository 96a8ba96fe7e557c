"""The frame format: varints, headers, records, raw resends."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exfilguard.codec.frame import (
    Header,
    NeedMore,
    Record,
    parse_header,
    parse_raw_resend,
    parse_record,
    raw_resend,
    read_varint,
    varint,
)
from exfilguard.errors import FrameCorrupt


@given(st.integers(min_value=0, max_value=(1 << 63) - 1))
def test_varint_roundtrip(n):
    b = varint(n)
    assert read_varint(b, 0) == (n, len(b))


def test_varint_rejects_non_minimal_and_long():
    with pytest.raises(FrameCorrupt):
        read_varint(b"\x80\x00", 0)
    with pytest.raises(FrameCorrupt):
        read_varint(b"\xff" * 11, 0)
    with pytest.raises(NeedMore):
        read_varint(b"\x80", 0)


@given(st.integers(0, 15), st.one_of(st.none(), st.integers(0, 0xFFFF)), st.integers(0, (1 << 63) - 1))
def test_header_roundtrip(cid, fp, sid):
    h = Header(cid, fp, sid)
    b = h.to_bytes()
    assert parse_header(b, 0, {cid: fp is not None}) == (h, len(b))


def test_header_is_small():
    assert len(Header(3, 0xBEEF, 5).to_bytes()) == 4
    assert len(Header(0, None, 5).to_bytes()) == 2


def test_bad_magic_and_unknown_codec():
    with pytest.raises(FrameCorrupt, match="not an exfilguard"):
        parse_header(b"\x13\x00", 0, {3: True})
    with pytest.raises(FrameCorrupt, match="unknown codec"):
        parse_header(b"\xaf\x00", 0, {3: True})


@given(st.integers(0, 100000), st.integers(0, 7), st.booleans(), st.binary(max_size=300))
def test_record_roundtrip(count, param, last, payload):
    if not last and count == 0:
        count = 1
    rec = Record(count, param, last, payload, b"\x01\x02\x03\x04" if last else b"\x01\x02")
    b = rec.to_bytes()
    assert parse_record(b, 0) == (rec, len(b))
    for cut in range(len(b)):
        with pytest.raises(NeedMore):
            parse_record(b[:cut], 0)


def test_raw_resend_roundtrip():
    assert parse_raw_resend(raw_resend(3, [5, 600, 0])) == (3, [5, 600, 0])
    with pytest.raises(FrameCorrupt):
        parse_raw_resend(varint(3) + varint(5) + varint(1))
