"""The streaming codec interface the inside and the outside program against.

The inside pushes each generated token into a StreamEncoder and sends what `flush()` returns;
the outside pushes the bytes it receives into a StreamDecoder and gets verified tokens back.
`exfilguard.codec` provides the real ones; `CodecRegistry` adapts it (imported lazily so this
module stays free of ML imports).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class StreamEncoder(Protocol):
    def push(self, token_id: int) -> None:
        """Add one generated token."""

    def flush(self) -> bytes:
        """Bytes for every token pushed since the last flush (b"" if none)."""

    def finish(self) -> bytes:
        """The last bytes of the stream (includes whatever is still buffered)."""

    def raw_chunk(self, index: int) -> bytes:
        """Chunk `index` re-coded raw, sent after the decoder reported Desync(index)."""


class StreamDecoder(Protocol):
    def push(self, data: bytes) -> list[int]:
        """Feed received bytes; return the tokens they complete. Raises FrameCorrupt / Desync."""

    def push_raw(self, index: int, data: bytes) -> list[int]:
        """Feed the raw resend of chunk `index` after a Desync; return its tokens."""

    def finish(self) -> list[int]:
        """The stream ended: return any last tokens; FrameCorrupt if it is incomplete."""


class CodecFactory(Protocol):
    """Makes encoders (inside) and decoders (outside) for one weak model."""

    names: Sequence[str]
    weak_fingerprint: str

    def encoder(self, codec: str, prompt_ids: Sequence[int], seed: int, temperature: float, top_p: float) -> StreamEncoder: ...

    def decoder(self, codec: str, prompt_ids: Sequence[int], seed: int, temperature: float, top_p: float) -> StreamDecoder: ...


def codec_factory(weak: Any) -> CodecFactory:
    """The real codec (exfilguard.codec) over weak model `weak`."""
    from exfilguard.protocol.codec_adapter import RealCodecFactory

    return RealCodecFactory(weak)
