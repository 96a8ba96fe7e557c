"""Streaming encoder and decoder over the v1 frame format.

The Encoder takes tokens one at a time and returns the bytes to send (the header first, then
a record at every flush). The Decoder takes bytes as they arrive and returns tokens as soon as
their chunk verifies. A chunk whose check fails raises Desync(chunk_index); answer it with
``decoder.resend(i, encoder.raw_chunk(i))`` and decoding carries on from the true tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from exfilguard.codec.codecs import Codec
from exfilguard.codec.frame import (
    MAX_STREAM_TOKENS,
    Header,
    NeedMore,
    Record,
    crc16,
    crc32,
    parse_header,
    parse_raw_resend,
    parse_record,
    raw_resend,
)
from exfilguard.codec.rangecoding import PayloadUndecodable
from exfilguard.codec.registry import codec_ids, codec_name
from exfilguard.errors import Desync, FrameCorrupt, ModelMismatch


class Encoder:
    """Pushes tokens into chunks; every method returns the bytes to send now (maybe b"").

    flush_every=None: one chunk, written by finish() (the cheapest stream); N: a record
    every N tokens so the decoder can start early and a desync costs one chunk."""

    def __init__(self, codec: Codec, prompt_ids: Sequence[int], stream_id: int = 0, flush_every: int | None = None):
        if flush_every is not None and flush_every < 1:
            raise ValueError("flush_every must be >= 1 or None")
        self.codec = codec
        self.stream_id = stream_id
        self.flush_every = flush_every
        self.chunks: list[list[int]] = []  # tokens of every chunk written so far
        self._state = codec.new_state(prompt_ids)
        self._buf: list[int] = []
        self._all: list[int] = []
        self._header = Header(codec.codec_id, codec.fingerprint_prefix, stream_id).to_bytes()
        self._header_sent = False
        self.finished = False

    def _out(self, data: bytes) -> bytes:
        if not self._header_sent:
            self._header_sent = True
            return self._header + data
        return data

    def push(self, token_id: int) -> bytes:
        """Add one token; returns a chunk record when it completes one."""
        if self.finished:
            raise ValueError("push after finish")
        if len(self._all) >= MAX_STREAM_TOKENS:
            raise ValueError(f"a stream holds at most {MAX_STREAM_TOKENS} tokens")
        tok = int(token_id)
        self._state.observe(tok)
        self._buf.append(tok)
        self._all.append(tok)
        if self.flush_every is not None and len(self._buf) >= self.flush_every:
            return self.flush()
        return self._out(b"")

    def push_many(self, token_ids: Sequence[int]) -> bytes:
        return b"".join(self.push(t) for t in token_ids)

    def flush(self) -> bytes:
        """End the current chunk now (nothing if it is empty)."""
        if not self._buf:
            return self._out(b"")
        toks, self._buf = self._buf, []
        param, payload = self._state.encode_chunk(toks)
        self.chunks.append(toks)
        return self._out(Record(len(toks), param, False, payload, crc16(toks)).to_bytes())

    def finish(self) -> bytes:
        """The final record: last chunk, total token count and CRC-32 of every id."""
        if self.finished:
            raise ValueError("finish called twice")
        self.finished = True
        toks, self._buf = self._buf, []
        param, payload = self._state.encode_chunk(toks) if toks else (0, b"")
        self.chunks.append(toks)
        return self._out(Record(len(self._all), param, True, payload, crc32(self._all)).to_bytes())

    def raw_chunk(self, chunk_index: int) -> bytes:
        """The raw resend message for a chunk the decoder reported as Desync."""
        if not 0 <= chunk_index < len(self.chunks):
            raise ValueError(f"no chunk {chunk_index} in this stream")
        return raw_resend(chunk_index, self.chunks[chunk_index])


class Decoder:
    """Feeds on bytes; returns verified tokens. Raises FrameCorrupt (bad magic, truncation,
    checksum), ModelMismatch (weak-model fingerprint) or Desync (ask for a raw resend)."""

    def __init__(self, codec: Codec, prompt_ids: Sequence[int], stream_id: int | None = None):
        self.codec = codec
        self.expected_stream_id = stream_id
        self.header: Header | None = None
        self.tokens: list[int] = []
        self.done = False
        self.chunk_index = 0
        self.resends = 0
        self._state = codec.new_state(prompt_ids)
        self._buf = bytearray()
        self._pos = 0
        self._awaiting: tuple[int, Record] | None = None  # a desynced chunk waiting for its resend
        self._undelivered: list[int] = []
        self._failed: FrameCorrupt | None = None

    @property
    def stream_id(self) -> int | None:
        return None if self.header is None else self.header.stream_id

    def feed(self, data: bytes) -> list[int]:
        """Take more bytes; return the tokens that verified because of them."""
        if self._failed is not None:
            raise FrameCorrupt(f"stream already rejected: {self._failed}")
        self._buf += data
        if self.done and self._pos < len(self._buf):
            self._fail(FrameCorrupt("bytes after the end of the codec stream"))
        if self._awaiting is not None:
            return []
        return self._run()

    def finish(self) -> list[int]:
        """The whole token sequence; FrameCorrupt if the stream is incomplete."""
        if self._failed is not None:
            raise FrameCorrupt(f"stream already rejected: {self._failed}")
        if self._awaiting is not None:
            raise Desync(f"chunk {self._awaiting[0]} still waits for a raw resend", self._awaiting[0])
        if not self.done:
            self._fail(FrameCorrupt("codec stream truncated: no end record"))
        return list(self.tokens)

    def resend(self, chunk_index: int, raw: bytes) -> list[int]:
        """Accept a raw replacement for the desynced chunk; return its tokens and any that
        verify after it from bytes already received."""
        if self._awaiting is None or self._awaiting[0] != chunk_index:
            raise ValueError(f"chunk {chunk_index} is not waiting for a resend")
        idx, ids = parse_raw_resend(raw)
        if idx != chunk_index:
            raise FrameCorrupt(f"raw resend is for chunk {idx}, expected {chunk_index}")
        _, rec = self._awaiting
        self._verify(rec, ids)  # the resend must match the chunk's own check
        self._awaiting = None
        self.resends += 1
        self._accept(rec, ids, resent=True)
        before, self._undelivered = self._undelivered, []
        try:
            more = self._run()
        except Desync:
            self._undelivered = before + ids + self._undelivered
            raise
        return before + ids + more

    # -- internals
    def _fail(self, exc: FrameCorrupt) -> None:
        self._failed = exc
        raise exc

    def _expected_count(self, rec: Record) -> int:
        if not rec.last:
            return rec.count
        n = rec.count - len(self.tokens)
        if n < 0:
            self._fail(FrameCorrupt("end record's token count is below the tokens already received"))
        return n

    def _verify(self, rec: Record, ids: list[int]) -> None:
        if len(ids) != self._expected_count(rec):
            raise FrameCorrupt("chunk does not hold the announced token count")
        want = crc32(self.tokens + ids) if rec.last else crc16(ids)
        if want != rec.check:
            raise FrameCorrupt("raw resend does not match the chunk's checksum")

    def _accept(self, rec: Record, ids: list[int], resent: bool = False) -> None:
        self._state.commit(ids, resent=resent)
        self.tokens += ids
        self.chunk_index += 1
        if rec.last:
            self.done = True
            if self._pos < len(self._buf):
                self._fail(FrameCorrupt("bytes after the end of the codec stream"))

    def _run(self) -> list[int]:
        out: list[int] = []
        try:
            if self.header is None:
                self._read_header()
            while not self.done:
                start = self._pos
                rec, end = parse_record(self._buf, self._pos)
                self._pos = end
                n = self._expected_count(rec)
                if len(self.tokens) + n > MAX_STREAM_TOKENS:
                    raise FrameCorrupt(f"stream claims more than {MAX_STREAM_TOKENS} tokens")
                try:
                    ids = self._state.decode_chunk(rec.param, rec.payload, n) if n else []
                except PayloadUndecodable:  # every range-decoder failure: the chunk is resendable
                    ids = None
                except FrameCorrupt:
                    raise
                except (ValueError, RuntimeError, IndexError, OverflowError, AssertionError):
                    ids = None  # a codec's own decoder rejecting garbage (zstd, ids out of range)
                want = crc32(self.tokens + (ids or [])) if rec.last else crc16(ids or [])
                if ids is None or len(ids) != n or want != rec.check:
                    self._awaiting = (self.chunk_index, rec)
                    raise Desync(
                        f"chunk {self.chunk_index} of stream {self.stream_id} failed its check "
                        f"({codec_name(self.header.codec_id)} codec; bytes {start}..{end}): ask for a raw resend",
                        self.chunk_index,
                    )
                self._accept(rec, ids)
                out += ids
        except NeedMore:
            pass
        except Desync:
            self._undelivered = out  # handed out by resend(); also in self.tokens
            raise
        except FrameCorrupt as exc:
            self._failed = exc
            raise
        return out

    def _read_header(self) -> None:
        header, pos = parse_header(self._buf, self._pos, codec_ids())
        if header.codec_id != self.codec.codec_id:
            self._fail(
                FrameCorrupt(
                    f"stream is coded with {codec_name(header.codec_id)!r}, this decoder expects {self.codec.name!r}"
                )
            )
        if header.fingerprint_prefix is not None and header.fingerprint_prefix != self.codec.fingerprint_prefix:
            exc = ModelMismatch(expected=str(self.codec.fingerprint), got=f"{header.fingerprint_prefix:04x}… (prefix)")
            self._failed = FrameCorrupt(str(exc))
            raise exc
        if self.expected_stream_id is not None and header.stream_id != self.expected_stream_id:
            self._fail(FrameCorrupt(f"stream id {header.stream_id} where {self.expected_stream_id} was expected"))
        self.header = header
        self._pos = pos


def encode_stream(
    codec: Codec, token_ids: Sequence[int], prompt_ids: Sequence[int], stream_id: int = 0, flush_every: int | None = None
) -> bytes:
    """One whole stream: header, chunks, end record."""
    enc = Encoder(codec, prompt_ids, stream_id, flush_every)
    return enc.push_many(token_ids) + enc.finish()


def decode_stream(codec: Codec, data: bytes, prompt_ids: Sequence[int], stream_id: int | None = None) -> list[int]:
    """Decode a whole stream; every error (Desync included) propagates."""
    dec = Decoder(codec, prompt_ids, stream_id)
    dec.feed(data)
    return dec.finish()
