"""Frames of the inside <-> outside protocol.

One TCP connection (through the meter) carries many answers at once. A frame is

    varint(slot << 3 | kind)  [varint(len)  payload]      (payload only for kinds that carry one)

Inside -> outside, kinds 5, 6 and 7 are DATA frames whose payload length the kind implies (4, 6
and 8 bytes: `DATA_IMPLIED`), so no length byte: a progressive flush (codec stream format v2)
ships a few settled bytes, and a length byte would cost ~15% of them. `encode_frame(Kind.DATA,
...)` picks the implied kind whenever the length allows; the reader returns Kind.DATA either way.

A slot is the outside's small integer name for one in-flight request; slots are reused, so
headers stay one byte for the first 16 concurrent requests. Inside -> outside (the capped
direction) an answer costs, beyond the codec's own bytes, 2-3 bytes per flush: the last flush is
an END frame, so there is no separate end-of-answer marker. A one-flush answer costs 2-3 bytes.

Inside -> outside kinds: HELLO (once per connection, slot 0, JSON, sent after the outside's
first frame so that a connect-and-leave probe costs no budget), DATA (codec bytes), END
(last codec bytes of an answer; frees the slot), FAIL (one code byte; frees the slot), RESEND
(varint chunk index + the raw bytes of that chunk, after a Desync).
Outside -> inside kinds: REQUEST (JSON GenerationRequest), CANCEL, RESEND_REQUEST (varint chunk).

The reader is strict: every frame that is malformed, too long or of an unknown kind raises
FrameCorrupt, and the connection must then be dropped (the other side cannot be resynchronised).
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from exfilguard.errors import FrameCorrupt, RequestInvalid

PROTOCOL_VERSION = 2  # 2: DATA frames of implied length (upstream kinds 5-7)
MAX_SLOT = 4095
MAX_VARINT_BYTES = 5
MAX_PAYLOAD = 1 << 20  # codec bytes of one flush; far above any real chunk
MAX_HELLO = 4096
MAX_REQUEST = 4 << 20  # prompt ids as JSON
MAX_PROMPT_TOKENS = 32768
MAX_STOP = 4
MAX_STOP_LEN = 256


class Kind(enum.IntEnum):
    """Frame kinds. The same number means different things in the two directions."""

    # inside -> outside
    HELLO = 0
    DATA = 1
    END = 2
    FAIL = 3
    RESEND = 4
    # outside -> inside
    REQUEST = 5
    CANCEL = 6
    RESEND_REQUEST = 7


UPSTREAM_KINDS = frozenset({Kind.HELLO, Kind.DATA, Kind.END, Kind.FAIL, Kind.RESEND})
DOWNSTREAM_KINDS = frozenset({Kind.REQUEST, Kind.CANCEL, Kind.RESEND_REQUEST})
_NO_PAYLOAD = frozenset({Kind.CANCEL})
# Upstream kind number -> payload length of a DATA frame without a length field.
DATA_IMPLIED: dict[int, int] = {5: 4, 6: 6, 7: 8}
_IMPLIED_KIND = {n: k for k, n in DATA_IMPLIED.items()}
_PAYLOAD_LIMIT = {
    Kind.HELLO: MAX_HELLO,
    Kind.DATA: MAX_PAYLOAD,
    Kind.END: MAX_PAYLOAD,
    Kind.FAIL: 1,
    Kind.RESEND: MAX_PAYLOAD + MAX_VARINT_BYTES,
    Kind.REQUEST: MAX_REQUEST,
    Kind.RESEND_REQUEST: MAX_VARINT_BYTES,
}


class FailCode(enum.IntEnum):
    """Why the inside ended an answer without END (one byte on the wire)."""

    CANCELLED = 1
    BAD_REQUEST = 2
    INTERNAL = 3
    OVERLOADED = 4
    UNSUPPORTED_CODEC = 5


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    kind: Kind
    slot: int
    payload: bytes = b""


def encode_varint(n: int) -> bytes:
    """LEB128 of a non-negative int."""
    if n < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def decode_varint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    """(value, next position), None if the buffer ends first; FrameCorrupt if over-long."""
    n = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= len(buf):
            return None
        b = buf[pos + i]
        n |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if i > 0 and b == 0:
                raise FrameCorrupt("protocol: non-minimal varint")
            return n, pos + i + 1
    raise FrameCorrupt("protocol: varint longer than 5 bytes")


def encode_frame(kind: Kind, slot: int, payload: bytes = b"") -> bytes:
    """The bytes of one frame."""
    if not 0 <= slot <= MAX_SLOT:
        raise ValueError(f"slot {slot} out of range")
    if kind == Kind.DATA and len(payload) in _IMPLIED_KIND:
        return encode_varint((slot << 3) | _IMPLIED_KIND[len(payload)]) + payload
    head = encode_varint((slot << 3) | int(kind))
    if kind in _NO_PAYLOAD:
        if payload:
            raise ValueError(f"{kind.name} carries no payload")
        return head
    if len(payload) > _PAYLOAD_LIMIT[kind]:
        raise ValueError(f"{kind.name} payload of {len(payload)} bytes is over the limit")
    return head + encode_varint(len(payload)) + payload


class FrameReader:
    """Incremental parser: feed it bytes as they arrive, get whole frames back.

    `direction` is "upstream" (frames the inside sends) or "downstream" (frames the outside
    sends); a kind from the other direction is a protocol violation."""

    def __init__(self, direction: str, max_buffer: int = MAX_REQUEST + 16):
        if direction not in ("upstream", "downstream"):
            raise ValueError(direction)
        self._allowed = UPSTREAM_KINDS if direction == "upstream" else DOWNSTREAM_KINDS
        self._upstream = direction == "upstream"
        self._buf = bytearray()
        self._max_buffer = max_buffer
        self.bytes_read = 0

    def feed(self, data: bytes) -> list[Frame]:
        """Append bytes; return every frame now complete. Raises FrameCorrupt on bad input."""
        self._buf += data
        self.bytes_read += len(data)
        frames: list[Frame] = []
        pos = 0
        buf = self._buf
        while pos < len(buf):
            head = decode_varint(buf, pos)
            if head is None:
                break
            value, p = head
            kind_no, slot = value & 7, value >> 3
            if self._upstream and kind_no in DATA_IMPLIED:
                if slot > MAX_SLOT:
                    raise FrameCorrupt(f"protocol: slot {slot} out of range")
                end = p + DATA_IMPLIED[kind_no]
                if end > len(buf):
                    break
                frames.append(Frame(Kind.DATA, slot, bytes(buf[p:end])))
                pos = end
                continue
            try:
                kind = Kind(kind_no)
            except ValueError:  # pragma: no cover - all 8 values are kinds
                raise FrameCorrupt(f"protocol: unknown frame kind {kind_no}") from None
            if kind not in self._allowed:
                raise FrameCorrupt(f"protocol: frame kind {kind.name} not allowed in this direction")
            if slot > MAX_SLOT:
                raise FrameCorrupt(f"protocol: slot {slot} out of range")
            if kind == Kind.HELLO and slot != 0:
                raise FrameCorrupt("protocol: HELLO must use slot 0")
            if kind in _NO_PAYLOAD:
                frames.append(Frame(kind, slot))
                pos = p
                continue
            ln = decode_varint(buf, p)
            if ln is None:
                break
            length, p = ln
            if length > _PAYLOAD_LIMIT[kind]:
                raise FrameCorrupt(f"protocol: {kind.name} payload of {length} bytes over the limit")
            if kind in (Kind.DATA, Kind.FAIL, Kind.RESEND, Kind.RESEND_REQUEST) and length == 0:
                raise FrameCorrupt(f"protocol: empty {kind.name} frame")
            if p + length > len(buf):
                break
            frames.append(Frame(kind, slot, bytes(buf[p : p + length])))
            pos = p + length
        del buf[:pos]
        if len(buf) > self._max_buffer:
            raise FrameCorrupt("protocol: incomplete frame larger than any allowed frame")
        return frames

    @property
    def pending(self) -> int:
        """Bytes held back because they do not yet form a whole frame."""
        return len(self._buf)


MIN_LATER_DATA = 4  # bytes: a DATA frame after an answer's first carries at least this much


def data_cut(n: int, first: bool = True) -> int:
    """How many of n pending codec bytes to send as one DATA frame now (the rest waits for the
    next flush or the END frame): a size whose length the frame kind implies where one fits
    with at most 4 bytes held back; everything when over 12. Under 4 bytes: all of them for an
    answer's first DATA frame (time to first token), none after it (a time-budget flush of a
    byte or two would pay 2 bytes of header for it; they go with the next frame)."""
    if n < MIN_LATER_DATA:
        return n if first else 0
    if n > 12 or n in _IMPLIED_KIND:
        return n
    return max(k for k in _IMPLIED_KIND if k <= n)


def parse_fail(payload: bytes) -> FailCode:
    """The code of a FAIL frame; FrameCorrupt if unknown."""
    try:
        return FailCode(payload[0])
    except (ValueError, IndexError):
        raise FrameCorrupt("protocol: unknown FAIL code") from None


def parse_resend(payload: bytes) -> tuple[int, bytes]:
    """(chunk index, raw chunk bytes) of a RESEND frame."""
    v = decode_varint(payload, 0)
    if v is None:
        raise FrameCorrupt("protocol: truncated RESEND frame")
    return v[0], payload[v[1] :]


def parse_chunk_index(payload: bytes) -> int:
    """The chunk index of a RESEND_REQUEST frame."""
    v = decode_varint(payload, 0)
    if v is None or v[1] != len(payload):
        raise FrameCorrupt("protocol: malformed RESEND_REQUEST frame")
    return v[0]


@dataclass
class Hello:
    """What the inside announces on connect (counted by the meter, so kept to ~40 bytes)."""

    version: int
    strong: str
    weak_fingerprint: str  # a prefix of the weak model's fingerprint (hex)

    def to_bytes(self) -> bytes:
        d = {"v": self.version, "s": self.strong[:64], "w": self.weak_fingerprint[:16]}
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, payload: bytes) -> "Hello":
        """Parse and validate a HELLO payload; FrameCorrupt on anything unexpected."""
        try:
            d = json.loads(payload.decode("utf-8"))
            hello = cls(version=int(d["v"]), strong=str(d["s"])[:64], weak_fingerprint=str(d["w"])[:16])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError):
            raise FrameCorrupt("protocol: malformed HELLO") from None
        if not all(c in "0123456789abcdef" for c in hello.weak_fingerprint):
            raise FrameCorrupt("protocol: malformed HELLO fingerprint")
        return hello


@dataclass
class GenerationRequest:
    """One generation job, outside -> inside. The outside always picks the seed."""

    prompt_ids: list[int]
    max_tokens: int
    seed: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    codec: str = "model"
    flush_every: int = 16  # tokens; 0 = only at the end
    flush_ms: float = 0.0  # also flush when this much time passed since the last flush; 0 = off

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, payload: bytes, vocab_size: int | None = None) -> "GenerationRequest":
        """Parse and validate; RequestInvalid (naming the field) on anything out of range."""
        try:
            d: dict[str, Any] = json.loads(payload.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise RequestInvalid("request is not JSON", "body") from None
        if not isinstance(d, dict):
            raise RequestInvalid("request is not an object", "body")

        def num(name: str, typ: type, lo: float, hi: float, default: Any = None) -> Any:
            v = d.get(name, default)
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RequestInvalid(f"{name} must be a number", name)
            if typ is int and not isinstance(v, int):
                raise RequestInvalid(f"{name} must be an integer", name)
            if not lo <= v <= hi:
                raise RequestInvalid(f"{name} must be between {lo} and {hi}", name)
            return typ(v)

        ids = d.get("prompt_ids")
        if not isinstance(ids, list) or not ids or len(ids) > MAX_PROMPT_TOKENS:
            raise RequestInvalid("prompt_ids must be a non-empty list of token ids", "prompt_ids")
        hi = (vocab_size or (1 << 31)) - 1
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= hi for t in ids):
            raise RequestInvalid("prompt_ids holds an id outside the vocabulary", "prompt_ids")
        stop = d.get("stop", [])
        if (
            not isinstance(stop, list)
            or len(stop) > MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LEN for s in stop)
        ):
            raise RequestInvalid("stop must be a list of up to 4 non-empty strings", "stop")
        codec = d.get("codec", "model")
        if not isinstance(codec, str) or len(codec) > 32:
            raise RequestInvalid("codec must be a short string", "codec")
        return cls(
            prompt_ids=list(ids),
            max_tokens=num("max_tokens", int, 1, 1 << 20),
            seed=num("seed", int, 0, (1 << 64) - 1),
            temperature=num("temperature", float, 0.0, 2.0, 1.0),
            top_p=num("top_p", float, 0.0, 1.0, 1.0),
            stop=stop,
            codec=codec,
            flush_every=num("flush_every", int, 0, 1 << 20, 16),
            flush_ms=num("flush_ms", float, 0.0, 3.6e6, 0.0),
        )
