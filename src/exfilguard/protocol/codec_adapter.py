"""Adapts exfilguard.codec's streaming Encoder/Decoder to the StreamEncoder/StreamDecoder the
inside and outside use. Imports the codec lazily (the model codec runs the weak model).

Every call into an encoder or decoder runs inside the weak model's batching region (`region`):
when the weak model is an exact student, the streams coded at the same moment by different
threads get their tables from one batched pass (models/exact_student.py, Stepper)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, ContextManager

from exfilguard.errors import ConfigError
from exfilguard.protocol.wire import data_cut


def _region_factory(weak: Any) -> Callable[[], ContextManager[Any]]:
    """`weak`'s batching region (its exact student's Stepper.active), or a no-op."""
    from exfilguard.models.exact_student import stepper_of  # numpy only, no torch at import

    st = stepper_of(weak)
    return st.active if st is not None else contextlib.nullcontext


class _Encoder:
    """Holds back what codec.Encoder.push returns (the header) until the next flush, so the
    header travels with the first chunk in one frame."""

    def __init__(self, enc: Any, region: Callable[[], ContextManager[Any]]):
        self._enc = enc
        self._held = bytearray()
        self._sent = False  # a DATA frame went out for this answer
        self.region = region  # the engine enters it around a step's sink calls (inside/engine.py)

    def push(self, token_id: int) -> None:
        with self.region():
            self._held += self._enc.push(token_id)

    def flush(self) -> bytes:
        with self.region():
            out = bytes(self._held) + self._enc.flush()
        # v2: send a length the DATA frame kind implies (one header byte, no length byte), and
        # after the first frame never fewer than 4 bytes; what is held back goes with the next
        # flush or the END frame. (v1 chunks go whole: a split record would hold its tokens
        # back until the next flush.)
        n = data_cut(len(out), first=not self._sent) if getattr(self._enc, "version", 1) == 2 else len(out)
        self._held[:] = out[n:]
        self._sent = self._sent or n > 0
        return out[:n]

    def finish(self) -> bytes:
        with self.region():
            out = bytes(self._held) + self._enc.finish()
        self._held.clear()
        return out

    def raw_chunk(self, index: int) -> bytes:
        try:
            return self._enc.raw_chunk(index)
        except ValueError:
            from exfilguard.errors import FrameCorrupt

            raise FrameCorrupt(f"protocol: RESEND_REQUEST for chunk {index}, which does not exist") from None


class _Decoder:
    def __init__(self, dec: Any, region: Callable[[], ContextManager[Any]]):
        self._dec = dec
        self.region = region

    def push(self, data: bytes) -> list[int]:
        with self.region():
            return self._dec.feed(data)

    def push_raw(self, index: int, data: bytes) -> list[int]:
        from exfilguard.errors import FrameCorrupt

        try:
            with self.region():
                return self._dec.resend(index, data)
        except ValueError as exc:
            raise FrameCorrupt(f"unexpected raw resend: {exc}") from None

    def finish(self) -> list[int]:
        # Raises if the stream is incomplete; returns what push() has not handed out (v2: the
        # last tokens, which only the end of the stream determines, after the check).
        with self.region():
            return self._dec.close()


class RealCodecFactory:
    """Encoders and decoders of exfilguard.codec over one weak model."""

    def __init__(self, weak: Any, options: dict[str, dict[str, Any]] | None = None):
        from exfilguard.codec import codec_names  # the registry lists every codec, coupled too

        self.weak = weak
        self.weak_fingerprint = str(weak.info.fingerprint)
        self.names = tuple(codec_names())
        # Encoders stay incremental (as the decoder is) by default: a batched teacher-forced
        # encoder is faster but its last-bit float differences desynced 2-10% of 16-token chunks
        # with the default student (docs/coupled.md), and every raw resend crosses the meter.
        # An exact weak model (the exact student) gives the same integers either way, so for it
        # options={"model": {"teacher_forced": True}, ...} cannot desync; it stays opt-in because a
        # teacher-forced chunk recomputes the whole prefix (slower than incremental with streaming).
        self._options = options or {}
        self._codecs: dict[str, Any] = {}
        self.region = _region_factory(weak)

    def codec(self, name: str) -> Any:
        """One codec object per name (its stats add up across streams)."""
        from exfilguard.codec import get_codec

        if name not in self._codecs:
            self._codecs[name] = get_codec(name, self.weak, **self._options.get(name, {}))
        return self._codecs[name]

    def _check(self, name: str) -> None:
        if name not in self.names:
            raise ConfigError(f"unknown codec {name!r}")

    def _bound(self, name: str, seed: int, temperature: float, top_p: float) -> Any:
        """The codec for one request: seeded codecs (coupled) are bound to its sampling."""
        self._check(name)
        c = self.codec(name)
        if hasattr(c, "for_request"):
            if top_p <= 0.0:  # the sampler treats top_p = 0 as greedy
                temperature, top_p = 0.0, 1.0
            c = c.for_request(seed % (1 << 64), temperature, top_p)
        return c

    def encoder(self, codec: str, prompt_ids: Sequence[int], seed: int, temperature: float, top_p: float) -> _Encoder:
        from exfilguard.codec import Encoder

        # header=False (both sides): a v2 stream's first byte only restates what the request and
        # the HELLO already fixed (codec, format), so it is not sent.
        enc = Encoder(self._bound(codec, seed, temperature, top_p), prompt_ids, stream_id=0, flush_every=None, header=False)
        return _Encoder(enc, self.region)

    def decoder(self, codec: str, prompt_ids: Sequence[int], seed: int, temperature: float, top_p: float) -> _Decoder:
        from exfilguard.codec import Decoder

        return _Decoder(Decoder(self._bound(codec, seed, temperature, top_p), prompt_ids, stream_id=0, header=False), self.region)
