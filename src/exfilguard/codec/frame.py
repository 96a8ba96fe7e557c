"""The stream format (v1): header, chunk records, end record. See docs/format.md.

    header := byte(0xA0 | codec_id) [fingerprint prefix, 2 bytes big-endian, model codecs only]
              varint(stream_id)
    record := varint(tag) varint(nbytes) payload[nbytes] check
              tag = count << 4 | param << 1 | last
              last = 0: count = tokens in the chunk (>= 1), check = CRC-16 of the chunk's ids
              last = 1: count = tokens in the whole stream,   check = CRC-32 of all ids
    ids are checksummed as their varint serialization (the `raw` codec's payload).

Everything here is pure functions over bytes: the parser is fed bytes from the other side of
the cap and raises FrameCorrupt on anything it does not accept.
"""

from __future__ import annotations

import binascii
import hashlib
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from exfilguard.errors import FrameCorrupt

MAGIC = 0xA0  # high nibble of the first byte: magic and format version 1
MAGIC_V2 = 0xB0  # format version 2: one progressive range-coded body (codec/stream.py)
MAX_VARINT_BYTES = 10
MAX_STREAM_TOKENS = 1 << 20  # a corrupt count must not make the decoder run a model for hours
MAX_CHUNK_BYTES = 1 << 24
MAX_STREAM_ID = (1 << 63) - 1


class NeedMore(Exception):
    """Not enough bytes yet (internal to the incremental parser)."""


def varint(n: int) -> bytes:
    """Unsigned LEB128."""
    if n < 0:
        raise ValueError("varint of a negative number")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def varints(values: Iterable[int]) -> bytes:
    return b"".join(varint(int(v)) for v in values)


def read_varint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    """(value, next position); NeedMore if the buffer ends inside it; FrameCorrupt if it is
    longer than MAX_VARINT_BYTES or not minimal (so one value has exactly one encoding)."""
    value = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= len(buf):
            raise NeedMore
        b = buf[pos + i]
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if b == 0 and i > 0:
                raise FrameCorrupt("non-minimal varint in codec stream")
            return value, pos + i + 1
    raise FrameCorrupt("varint too long in codec stream")


def parse_varints(payload: bytes) -> list[int]:
    """All varints of a payload; FrameCorrupt if it ends inside one."""
    out, pos = [], 0
    try:
        while pos < len(payload):
            v, pos = read_varint(payload, pos)
            out.append(v)
    except NeedMore:
        raise FrameCorrupt("truncated varint list in codec stream") from None
    return out


def crc16(ids: Sequence[int]) -> bytes:
    """CRC-16/XMODEM (binascii.crc_hqx) of the ids' varints, big-endian."""
    return binascii.crc_hqx(varints(ids), 0).to_bytes(2, "big")


def crc32(ids: Sequence[int]) -> bytes:
    """CRC-32 (zlib) of the ids' varints, big-endian."""
    return zlib.crc32(varints(ids)).to_bytes(4, "big")


@dataclass(frozen=True)
class Header:
    codec_id: int
    fingerprint_prefix: int | None  # 16 bits, model codecs only
    stream_id: int

    def to_bytes(self) -> bytes:
        if not 0 <= self.codec_id <= 15:
            raise ValueError("codec id must fit in 4 bits")
        if not 0 <= self.stream_id <= MAX_STREAM_ID:
            raise ValueError("stream id must be a non-negative 63-bit integer")
        out = bytes([MAGIC | self.codec_id])
        if self.fingerprint_prefix is not None:
            out += self.fingerprint_prefix.to_bytes(2, "big")
        return out + varint(self.stream_id)


def parse_header(buf: bytes | bytearray, pos: int, has_fingerprint: dict[int, bool]) -> tuple[Header, int]:
    """Parse a header; `has_fingerprint` maps each known codec id to whether it carries one."""
    if pos >= len(buf):
        raise NeedMore
    b0 = buf[pos]
    if b0 & 0xF0 != MAGIC:
        raise FrameCorrupt(f"not an exfilguard codec stream (first byte 0x{b0:02x}; expected 0xA_ for format v1)")
    codec_id = b0 & 0x0F
    if codec_id not in has_fingerprint:
        raise FrameCorrupt(f"unknown codec id {codec_id} in stream header")
    pos += 1
    fp = None
    if has_fingerprint[codec_id]:
        if pos + 2 > len(buf):
            raise NeedMore
        fp = int.from_bytes(bytes(buf[pos : pos + 2]), "big")
        pos += 2
    sid, pos = read_varint(buf, pos)
    if sid > MAX_STREAM_ID:
        raise FrameCorrupt("stream id out of range")
    return Header(codec_id, fp, sid), pos


@dataclass(frozen=True)
class Record:
    """One chunk: `count` is the chunk's tokens, or the stream total when `last`."""

    count: int
    param: int
    last: bool
    payload: bytes
    check: bytes

    def to_bytes(self) -> bytes:
        if not 0 <= self.param <= 7:
            raise ValueError("chunk param must fit in 3 bits")
        tag = (self.count << 4) | (self.param << 1) | int(self.last)
        return varint(tag) + varint(len(self.payload)) + self.payload + self.check


def parse_record(buf: bytes | bytearray, pos: int) -> tuple[Record, int]:
    """Parse one record at `pos`: NeedMore if incomplete, FrameCorrupt if malformed."""
    tag, p = read_varint(buf, pos)
    count, param, last = tag >> 4, (tag >> 1) & 7, bool(tag & 1)
    if count > MAX_STREAM_TOKENS:
        raise FrameCorrupt(f"chunk claims {count} tokens (limit {MAX_STREAM_TOKENS})")
    if not last and count == 0:
        raise FrameCorrupt("empty non-final chunk in codec stream")
    n, p = read_varint(buf, p)
    if n > MAX_CHUNK_BYTES:
        raise FrameCorrupt(f"chunk claims {n} payload bytes (limit {MAX_CHUNK_BYTES})")
    check_len = 4 if last else 2
    if p + n + check_len > len(buf):
        raise NeedMore
    payload = bytes(buf[p : p + n])
    check = bytes(buf[p + n : p + n + check_len])
    return Record(count, param, last, payload, check), p + n + check_len


# ---------------------------------------------------------------- format v2
#
#   stream := byte(0xB0 | codec_id) body
#   body   := range-coded symbols (rangecoding.SettlingEncoder), see docs/format.md:
#             { ctl [param] token }* END check
#
# Everything a v1 header said per stream (fingerprint prefix, stream id) is folded into the
# keyed check instead, so it costs no bits and is still verified.

CHECK_BITS = 32
CTL_TOTAL = 1 << 24
CTL_RARE = 1 << 15  # frequency of END and of SWITCH: 9 bits each, 0.0028 bits per NEXT
CTL_NEXT, CTL_SWITCH, CTL_END = 0, 1, 2


def ctl_cumulative(n_params: int) -> list[int]:
    """Cumulative table of the control symbol before each token: NEXT, [SWITCH,] END."""
    if n_params > 1:
        return [0, CTL_TOTAL - 2 * CTL_RARE, CTL_TOTAL - CTL_RARE, CTL_TOTAL]
    return [0, CTL_TOTAL - CTL_RARE, CTL_TOTAL]


def ctl_symbol(n_params: int, index: int) -> int:
    """The control value (CTL_*) of a decoded control symbol index."""
    if n_params > 1:
        return index
    return CTL_NEXT if index == 0 else CTL_END


def stream_check(codec_id: int, fingerprint: str | None, stream_id: int, prompt_ids: Sequence[int]) -> "hashlib._Hash":
    """The running hash whose first CHECK_BITS bits end a v2 stream: BLAKE2b keyed by what the
    two sides must agree on (codec, weak-model fingerprint, stream id, prompt), then fed every
    token id as a varint. A different model, stream, prompt or any corruption fails it."""
    h = hashlib.blake2b(digest_size=8, person=b"exfilguard-v2")
    h.update(bytes([codec_id]))
    h.update(varint(stream_id))
    fp = (fingerprint or "").encode()
    h.update(varint(len(fp)) + fp)
    h.update(varint(len(prompt_ids)))
    h.update(varints(prompt_ids))
    return h


def check_value(h: "hashlib._Hash") -> int:
    return int.from_bytes(h.digest()[: CHECK_BITS // 8], "big")


def raw_resend(chunk_index: int, ids: Sequence[int]) -> bytes:
    """The side message answering a Desync: chunk index, count and the chunk's ids as varints."""
    return varint(chunk_index) + varint(len(ids)) + varints(ids)


def parse_raw_resend(data: bytes) -> tuple[int, list[int]]:
    """(chunk index, ids) of a raw resend message; FrameCorrupt if malformed."""
    values = parse_varints(data)
    if len(values) < 2 or values[1] != len(values) - 2:
        raise FrameCorrupt("malformed raw resend message")
    return values[0], values[2:]
