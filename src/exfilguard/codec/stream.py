"""Streaming encoder and decoder over the stream formats (docs/format.md).

Format v2 (codecs whose weak model has exact tables: `model`, `coupled`): one range coder per
answer. `Encoder.flush()` codes the tokens pushed since the last flush and returns only the
bytes that have *settled* (no seal, no record); `finish()` seals once. The Decoder returns every
token the bytes received so far determine, whatever bytes come next.

Format v1 (zstd codecs, raw, float weak models): the Encoder returns the header, then a record
at every flush. The Decoder returns tokens as soon as their chunk verifies. A chunk whose check
fails raises Desync(chunk_index); answer it with ``decoder.resend(i, encoder.raw_chunk(i))``
and decoding carries on from the true tokens.

`Encoder` picks the format (v2 wherever the codec offers it); `Decoder` reads it from the
stream's first byte, so it decodes both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from exfilguard.codec.codecs import Codec
from exfilguard.codec.frame import (
    CHECK_BITS,
    CTL_END,
    CTL_NEXT,
    CTL_SWITCH,
    MAGIC,
    MAGIC_V2,
    MAX_STREAM_TOKENS,
    Header,
    check_value,
    ctl_cumulative,
    ctl_symbol,
    stream_check,
    varint,
    NeedMore,
    Record,
    crc16,
    crc32,
    parse_header,
    parse_raw_resend,
    parse_record,
    raw_resend,
)
import numpy as np

from exfilguard.codec.rangecoding import (
    PayloadUndecodable,
    SettlingDecoder,
    SettlingEncoder,
    dist_cumulative,
    encode_token,
)
from exfilguard.codec.registry import codec_ids, codec_name
from exfilguard.errors import Desync, FrameCorrupt, ModelMismatch


class EncoderV1:
    """Format v1. Pushes tokens into chunks; every method returns the bytes to send now (maybe b"").

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


class DecoderV1:
    """Format v1. Feeds on bytes; returns verified tokens. Raises FrameCorrupt (bad magic, truncation,
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


# ---------------------------------------------------------------- format v2

SWITCH_BITS = 12.0  # about what a SWITCH costs (9 bits) plus its param: switch only when cheaper


class EncoderV2:
    """Format v2: one range coder for the whole stream.

    push() codes nothing yet; flush() codes the tokens pushed since the last flush as one
    *segment* (the codec picks its param for it) and returns the bytes that settled: a prefix of
    the final stream, never taken back. finish() codes END and the check and seals."""

    version = 2

    def __init__(self, codec: Codec, prompt_ids: Sequence[int], stream_id: int = 0, flush_every: int | None = None,
                 header: bool = True):
        if flush_every is not None and flush_every < 1:
            raise ValueError("flush_every must be >= 1 or None")
        if not 0 <= codec.codec_id <= 15:
            raise ValueError("codec id must fit in 4 bits")
        self.codec = codec
        self.stream_id = stream_id
        self.flush_every = flush_every
        self._state: Any = codec.new_state(prompt_ids)
        self._n_params = int(self._state.n_params)
        self._rc = SettlingEncoder()
        self._check = stream_check(codec.codec_id, codec.fingerprint, stream_id, prompt_ids)
        self._param: int | None = None
        self._buf: list[int] = []
        self._count = 0
        self._header_sent = not header  # headerless: both sides know the format (see Encoder)
        self.finished = False
        self.segments = 0

    def _out(self, data: bytes) -> bytes:
        if not self._header_sent:
            self._header_sent = True
            return bytes([MAGIC_V2 | self.codec.codec_id]) + data
        return data

    def push(self, token_id: int) -> bytes:
        """Add one token; returns the settled bytes when it completes a flush (else b"")."""
        if self.finished:
            raise ValueError("push after finish")
        if self._count >= MAX_STREAM_TOKENS:
            raise ValueError(f"a stream holds at most {MAX_STREAM_TOKENS} tokens")
        tok = int(token_id)
        self._state.observe(tok)
        self._buf.append(tok)
        self._count += 1
        if self.flush_every is not None and len(self._buf) >= self.flush_every:
            return self.flush()
        return b""

    def push_many(self, token_ids: Sequence[int]) -> bytes:
        return b"".join(self.push(t) for t in token_ids)

    def _code_segment(self) -> None:
        toks, self._buf = self._buf, []
        if not toks:
            return
        st, rc = self._state, self._rc
        rows = st.segment_rows(toks)
        costs = np.asarray(st.param_costs(rows, toks), dtype=np.float64)
        best = int(np.argmin(costs))
        switch = self._param is None or (best != self._param and costs[best] + SWITCH_BITS < costs[self._param])
        if switch:
            self._param = best
        ctl = ctl_cumulative(self._n_params)
        for i, (row, tok) in enumerate(zip(rows, toks)):
            first_of_stream = i == 0 and self.segments == 0
            sym = CTL_SWITCH if (i == 0 and switch and not first_of_stream and self._n_params > 1) else CTL_NEXT
            idx = sym if self._n_params > 1 else 0
            rc.encode(ctl[idx], ctl[idx + 1] - ctl[idx], ctl[-1])
            if self._n_params > 1 and (sym == CTL_SWITCH or first_of_stream):
                rc.encode(self._param, 1, self._n_params)
            encode_token(rc, st.row_dist(row, self._param), tok)
            self._check.update(varint(tok))
        st.commit_tokens(toks, rows)
        self.segments += 1

    def flush(self) -> bytes:
        """Code the pending tokens; return the header (first time) and the newly settled bytes."""
        if self.finished:
            raise ValueError("flush after finish")
        self._code_segment()
        out = self._rc.take()
        return self._out(out) if out or self._header_sent else b""

    def finish(self) -> bytes:
        """Code the rest, END and the check; the last bytes of the stream."""
        if self.finished:
            raise ValueError("finish called twice")
        self._code_segment()
        self.finished = True
        ctl = ctl_cumulative(self._n_params)
        end = len(ctl) - 2
        self._rc.encode(ctl[end], ctl[end + 1] - ctl[end], ctl[-1])
        value = check_value(self._check)
        for shift in range(CHECK_BITS - 16, -1, -16):  # 16 bits per symbol
            self._rc.encode((value >> shift) & 0xFFFF, 1, 1 << 16)
        return self._out(self._rc.finish())

    def raw_chunk(self, chunk_index: int) -> bytes:
        raise ValueError("a v2 stream has no chunks to resend (its tables are exact: it cannot desync)")


class DecoderV2:
    """Format v2 decoder: returns every token the received bytes determine.

    Tokens returned by feed() are determined by bytes that arrived: any continuation of them
    decodes to the same tokens. Tokens that only the end of the stream determines (the encoder
    drops trailing zero bytes) are returned by finish(), after the check verified. Raises
    FrameCorrupt on a stream that is truncated, corrupt or fails its check."""

    version = 2

    def __init__(self, codec: Codec, prompt_ids: Sequence[int], stream_id: int | None = None):
        self.codec = codec
        self.stream_id = 0 if stream_id is None else stream_id  # v2 does not send it: it keys the check
        self.tokens: list[int] = []
        self.done = False
        self.resends = 0
        self._state: Any = codec.new_state(prompt_ids)
        self._n_params = int(self._state.n_params)
        self._ctl = np.asarray(ctl_cumulative(self._n_params), dtype=np.int64)
        self._rc = SettlingDecoder()
        self._check = stream_check(codec.codec_id, codec.fingerprint, self.stream_id, prompt_ids)
        self._stage = "ctl"
        self._param: int | None = None
        self._dist: Any = None  # the next token's table, kept while the bytes do not determine it
        self._cum: np.ndarray | None = None
        self._check_got = 0
        self._check_left = CHECK_BITS // 16
        self._held: list[int] = []  # decoded from the zero padding after the end: out after the check
        self._failed: FrameCorrupt | None = None
        self._closed = False

    def feed(self, data: bytes) -> list[int]:
        """Take more stream bytes (after the header byte); return the tokens they determine."""
        if self._failed is not None:
            raise FrameCorrupt(f"stream already rejected: {self._failed}")
        try:
            self._rc.feed(data)
            return self._run()
        except FrameCorrupt as exc:
            self._failed = exc
            raise

    def close(self) -> list[int]:
        """The stream ended: the tokens feed() did not return (checked); FrameCorrupt if it is
        truncated, corrupt or fails its check."""
        if self._failed is not None:
            raise FrameCorrupt(f"stream already rejected: {self._failed}")
        if self._closed:
            return []
        try:
            self._rc.end()
            self._run()
            if not self.done:
                raise FrameCorrupt("codec stream truncated: it ends before its end symbol and check")
            if not self._rc.tail_matches():
                raise FrameCorrupt("codec stream corrupt: bytes after its end, or a tail the encoder cannot have written")
        except FrameCorrupt as exc:
            self._failed = exc
            raise
        self._closed = True
        out, self._held = self._held, []
        return out

    def finish(self) -> list[int]:
        """The whole token sequence, checked; FrameCorrupt if the stream is incomplete."""
        self.close()
        return list(self.tokens)

    def _run(self) -> list[int]:
        out: list[int] = []
        rc = self._rc
        n = self._n_params
        while not self.done:
            if self._stage == "ctl":
                s = rc.decode_table(self._ctl)
                if s is None:
                    break
                ctl = ctl_symbol(n, s)
                if ctl == CTL_END:
                    self._stage = "check"
                elif ctl == CTL_SWITCH or (n > 1 and self._param is None):
                    self._stage = "param"
                else:
                    self._stage = "token"
                if ctl != CTL_END and len(self.tokens) >= MAX_STREAM_TOKENS:
                    raise FrameCorrupt(f"stream holds more than {MAX_STREAM_TOKENS} tokens")
            elif self._stage == "param":
                p = rc.decode_uniform(n)
                if p is None:
                    break
                self._param = p
                self._stage = "token"
            elif self._stage == "token":
                if self._dist is None:
                    try:
                        self._dist = self._state.row_dist(self._state.next_row(), self._param or 0)
                    except FrameCorrupt:
                        raise
                    except (ValueError, IndexError) as exc:
                        raise FrameCorrupt(f"codec stream corrupt: {exc}") from None
                    self._cum = dist_cumulative(self._dist)
                s = rc.decode_table(self._cum)
                if s is None:
                    break
                k = self._dist.order.size
                if s < k:
                    self._take(int(self._dist.order[s]), out)
                elif self._dist.tail_size < 1:
                    raise FrameCorrupt("codec stream corrupt: escape where the table has no tail")
                elif self._dist.tail_size == 1:
                    self._take(self._dist.tail_token(0), out)
                else:
                    self._stage = "tail"
            elif self._stage == "tail":
                i = rc.decode_uniform(self._dist.tail_size)
                if i is None:
                    break
                self._take(self._dist.tail_token(i), out)
            else:  # check
                v = rc.decode_uniform(1 << 16)
                if v is None:
                    break
                self._check_got = (self._check_got << 16) | v
                self._check_left -= 1
                if self._check_left == 0:
                    if self._check_got != check_value(self._check):
                        raise FrameCorrupt(
                            "codec stream failed its check: corrupt, or coded for another weak model, prompt or stream"
                        )
                    self.done = True
        if rc.ended:  # determined by the zero padding only: handed out by finish() once checked
            self._held += out
            return []
        return out

    def _take(self, tok: int, out: list[int]) -> None:
        self._state.accept(tok)
        self._check.update(varint(tok))
        self.tokens.append(tok)
        out.append(tok)
        self._dist = self._cum = None
        self._stage = "ctl"

    def resend(self, chunk_index: int, raw: bytes) -> list[int]:
        raise ValueError("a v2 stream has no chunks to resend")


# ---------------------------------------------------------------- format choice


class Encoder:
    """A stream encoder: format v2 where the codec offers it (exact weak-model tables), else v1.

    version=1 or 2 forces a format. header=False drops v2's first byte where the decoder is
    made with header=False too: both sides then derive the format from the codec (v2 wherever
    it is offered), as the inside and outside do (8 bits less per answer). Every method returns
    the bytes to send now (maybe b"")."""

    def __init__(self, codec: Codec, prompt_ids: Sequence[int], stream_id: int = 0, flush_every: int | None = None,
                 version: int | None = None, header: bool = True):
        if version is None:
            version = 2 if _offers_v2(codec, prompt_ids) else 1
        if version not in (1, 2):
            raise ValueError("stream format version must be 1 or 2")
        if version == 2:
            self._impl: Any = EncoderV2(codec, prompt_ids, stream_id, flush_every, header=header)
        else:
            self._impl = EncoderV1(codec, prompt_ids, stream_id, flush_every)
        self.version = version

    def __getattr__(self, name: str) -> Any:
        return getattr(self._impl, name)

    def push(self, token_id: int) -> bytes:
        return self._impl.push(token_id)

    def push_many(self, token_ids: Sequence[int]) -> bytes:
        return self._impl.push_many(token_ids)

    def flush(self) -> bytes:
        return self._impl.flush()

    def finish(self) -> bytes:
        return self._impl.finish()

    def raw_chunk(self, chunk_index: int) -> bytes:
        return self._impl.raw_chunk(chunk_index)


def _offers_v2(codec: Codec, prompt_ids: Sequence[int]) -> bool:
    if not getattr(codec, "uses_model", False) or not prompt_ids:
        return False
    state = codec.new_state(prompt_ids)
    return bool(getattr(state, "progressive", False))


class Decoder:
    """A stream decoder for both formats (the first byte says which). Feeds on bytes and
    returns tokens; raises FrameCorrupt (bad magic, truncation, check), ModelMismatch (v1
    fingerprint) or Desync (v1: ask for a raw resend)."""

    def __init__(self, codec: Codec, prompt_ids: Sequence[int], stream_id: int | None = None, header: bool = True):
        self.codec = codec
        self._prompt = list(prompt_ids)
        self.expected_stream_id = stream_id
        self._impl: Any = None
        self._pre = bytearray()
        self._failed: FrameCorrupt | None = None
        if not header and _offers_v2(codec, self._prompt):  # the encoder sent no header byte
            self._impl = DecoderV2(codec, self._prompt, stream_id)

    def __getattr__(self, name: str) -> Any:
        impl = self.__dict__.get("_impl")
        if impl is None:
            defaults = {"tokens": [], "done": False, "header": None, "stream_id": None, "chunk_index": 0, "resends": 0}
            if name in defaults:
                return defaults[name]
            raise AttributeError(name)
        return getattr(impl, name)

    @property
    def version(self) -> int | None:
        return None if self._impl is None else self._impl.version

    def _start(self) -> bytes:
        b0 = self._pre[0]
        if b0 & 0xF0 == MAGIC_V2:
            if b0 & 0x0F != self.codec.codec_id:
                exc = FrameCorrupt(
                    f"stream is coded with {codec_name(b0 & 0x0F)!r}, this decoder expects {self.codec.name!r}"
                )
                self._failed = exc
                raise exc
            if not getattr(self.codec, "uses_model", False) or not hasattr(self.codec.new_state(self._prompt), "row_dist"):
                exc = FrameCorrupt(f"a format v2 stream for the {self.codec.name!r} codec, which only has format v1")
                self._failed = exc
                raise exc
            self._impl = DecoderV2(self.codec, self._prompt, self.expected_stream_id)
            rest = bytes(self._pre[1:])
        elif b0 & 0xF0 == MAGIC:
            self._impl = DecoderV1(self.codec, self._prompt, self.expected_stream_id)
            self._impl.version = 1
            rest = bytes(self._pre)
        else:
            exc = FrameCorrupt(
                f"not an exfilguard codec stream (first byte 0x{b0:02x}; expected 0xB_ for format v2 or 0xA_ for v1)"
            )
            self._failed = exc
            raise exc
        self._pre.clear()
        return rest

    def feed(self, data: bytes) -> list[int]:
        """Take more bytes; return the tokens they determine (v2) or verify (v1)."""
        if self._failed is not None:
            raise FrameCorrupt(f"stream already rejected: {self._failed}")
        if self._impl is None:
            self._pre += data
            if not self._pre:
                return []
            data = self._start()
        return self._impl.feed(data)

    def finish(self) -> list[int]:
        """v2: the last tokens, after the check; v1: the whole token list. FrameCorrupt if incomplete."""
        if self._failed is not None:
            raise FrameCorrupt(f"stream already rejected: {self._failed}")
        if self._impl is None:
            self._failed = FrameCorrupt("codec stream truncated: no header")
            raise self._failed
        return self._impl.finish()

    def close(self) -> list[int]:
        """The stream ended: the tokens feed() has not returned yet (v2: those only the end
        determines; v1: none), checked. FrameCorrupt if the stream is incomplete."""
        if self._impl is not None and self._impl.version == 2:
            if self._failed is not None:
                raise FrameCorrupt(f"stream already rejected: {self._failed}")
            return self._impl.close()
        self.finish()
        return []

    def resend(self, chunk_index: int, raw: bytes) -> list[int]:
        if self._impl is None:
            raise ValueError(f"chunk {chunk_index} is not waiting for a resend")
        return self._impl.resend(chunk_index, raw)


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
