"""The outside's end of the protocol: one persistent connection to the inside, through the meter.

Everything read here came from the untrusted inside: frames are parsed strictly, a frame for a
slot the outside did not open is a protocol violation, and any violation drops the connection
and fails every answer on it with FrameCorrupt. When the connection drops, `StatusProbe` asks the
meter why: budget exhausted (429) or meter / inside down (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from exfilguard.errors import (
    BudgetExhausted,
    Desync,
    ExfilguardError,
    FrameCorrupt,
    ModelMismatch,
    RequestInvalid,
    UpstreamUnavailable,
)
from exfilguard.protocol.streams import CodecFactory
from exfilguard.protocol.wire import (
    MAX_SLOT,
    FailCode,
    Frame,
    FrameReader,
    GenerationRequest,
    Hello,
    Kind,
    encode_frame,
    encode_varint,
    parse_fail,
    parse_resend,
)

log = logging.getLogger(__name__)

# "exhausted" (budget spent), "ok" (meter up, budget left), "down" (meter unreachable).
StatusProbe = Callable[[], Awaitable[str]]

# Decoding threads per connection. Each answer's bytes are decoded on one of them; answers decoded
# at the same moment get their weak-model tables from one batched pass (continuous batching:
# an answer joins the pass when its bytes arrive, leaves when they are decoded), so this is also
# the largest batch. asyncio's default pool (cores + 4 threads) would cap the batch at 6.
DECODE_THREADS = 64


async def no_probe() -> str:
    return "down"


def http_status_probe(url: str) -> StatusProbe:
    """Ask the meter's read-only status endpoint (GET URL, JSON) whether the budget is spent."""

    async def probe() -> str:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=2.0) as c:
                r = await c.get(url)
            d = r.json()
        except Exception:
            return "down"
        return status_from_json(d)

    return probe


def status_from_json(d: Any) -> str:
    """Read a meter status object: exhausted if no bytes remain or the state says so."""
    if not isinstance(d, dict):
        return "down"
    state = str(d.get("state", "")).lower()
    if "exhaust" in state:
        return "exhausted"
    for key in ("remaining", "remaining_bytes", "bytes_remaining"):
        v = d.get(key)
        if isinstance(v, (int, float)) and v <= 0:
            return "exhausted"
    if state in ("down", "ledger_unavailable", "failed", "closed"):
        return "down"
    return "ok"


@dataclass
class _Stream:
    queue: asyncio.Queue[Frame | ExfilguardError]
    draining: bool = False  # the outside gave up on it; waiting for END/FAIL to free the slot
    on_bytes: Callable[[int], None] | None = None  # told the wire size of each frame of this slot
    freed: asyncio.Event = field(default_factory=asyncio.Event)  # END/FAIL arrived (or the connection died)


class InsideConnection:
    """One persistent connection carrying many answers at once."""

    def __init__(self, host: str, port: int, codecs: CodecFactory, probe: StatusProbe = no_probe,
                 hello_timeout: float = 30.0, max_streams: int = 1024, drain_timeout: float = 5.0):
        self.host, self.port, self.codecs, self.probe = host, port, codecs, probe
        self.hello_timeout = hello_timeout
        self.drain_timeout = drain_timeout  # how long a given-up answer waits for its last frames
        # Told the wire size of each connection's HELLO: metered bytes no answer carries (the request log).
        self.on_connect: list[Callable[[int], None]] = []
        self.max_streams = min(max_streams, MAX_SLOT + 1)
        self.hello: Hello | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._streams: dict[int, _Stream] = {}
        self._lock = asyncio.Lock()
        self._dead: ExfilguardError | None = None
        self.bytes_in = 0
        self.tokens_in = 0  # tokens decoded from what crossed the meter: the denominator of bits per token
        self._pool: ThreadPoolExecutor | None = None

    async def _decode(self, fn: Callable[..., list[int]], *args: Any) -> list[int]:
        """Run a decoder call on the connection's decoding threads."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="exfilguard-decode")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- connection ---------------------------------------------------------------------------
    async def _connect(self) -> None:
        async with self._lock:
            if self._writer is not None and self._dead is None:
                return
            self._dead = None
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 10)
            except (OSError, asyncio.TimeoutError):
                raise await self._why_down("cannot connect to the meter") from None
            frames = FrameReader("upstream")
            # The inside says HELLO only after our first frame: a CANCEL of slot 0, a no-op.
            writer.write(encode_frame(Kind.CANCEL, 0))
            try:
                hello_frame = await asyncio.wait_for(self._read_hello(reader, frames), self.hello_timeout)
            except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError, EOFError):
                writer.close()
                raise await self._why_down("the inside did not answer through the meter") from None
            except FrameCorrupt:
                writer.close()
                raise
            self.hello = Hello.from_bytes(hello_frame.payload)
            for cb in self.on_connect:
                cb(_frame_size(hello_frame))
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read_loop(reader, frames))

    async def _read_hello(self, reader: asyncio.StreamReader, frames: FrameReader) -> Frame:
        while True:
            data = await reader.read(4096)
            if not data:
                raise EOFError
            self.bytes_in += len(data)
            got = frames.feed(data)
            if got:
                if got[0].kind != Kind.HELLO or len(got) > 1:
                    raise FrameCorrupt("protocol: the inside must start with HELLO alone")
                return got[0]

    async def _why_down(self, what: str) -> ExfilguardError:
        state = await self.probe()
        if state == "exhausted":
            return BudgetExhausted("the egress budget is exhausted; the meter forwards nothing more (ask the operators to raise the cap)")
        return UpstreamUnavailable(f"{what} ({self.host}:{self.port}); the meter or the inside worker is down, retry later")

    async def _read_loop(self, reader: asyncio.StreamReader, frames: FrameReader) -> None:
        err: ExfilguardError
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    err = await self._why_down("the connection through the meter closed")
                    break
                self.bytes_in += len(data)
                for f in frames.feed(data):
                    self._dispatch(f)
        except FrameCorrupt as exc:
            err = exc
        except (ConnectionError, OSError):
            err = await self._why_down("the connection through the meter broke")
        except asyncio.CancelledError:
            err = UpstreamUnavailable("the outside is shutting down")
        self._dead = err
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        for slot, st in list(self._streams.items()):
            st.queue.put_nowait(err)
            st.freed.set()
            if st.draining:
                del self._streams[slot]

    def _dispatch(self, f: Frame) -> None:
        st = self._streams.get(f.slot)
        if f.kind == Kind.HELLO:
            raise FrameCorrupt("protocol: second HELLO")
        if st is None:
            raise FrameCorrupt(f"protocol: {f.kind.name} frame for slot {f.slot}, which is not open")
        # Every frame of a slot crossed the meter for that answer, drained ones included.
        if st.on_bytes is not None:
            st.on_bytes(len(encode_frame(f.kind, f.slot, f.payload)))
        if st.draining:
            if f.kind in (Kind.END, Kind.FAIL):
                del self._streams[f.slot]
                st.freed.set()
            return
        st.queue.put_nowait(f)

    def _send(self, data: bytes) -> None:
        if self._writer is None or self._dead is not None:
            raise self._dead or UpstreamUnavailable("not connected to the inside")
        self._writer.write(data)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except BaseException:
                pass
        if self._writer is not None:
            self._writer.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    # -- one answer ---------------------------------------------------------------------------
    async def generate(self, req: GenerationRequest, weak_fingerprint: str,
                       on_bytes: Callable[[int], None] | None = None,
                       stats: dict[str, int] | None = None) -> AsyncIterator[list[int]]:
        """Send one request; yield decoded, verified token ids as they arrive.

        `on_bytes` is told the wire size of every frame of this answer as it arrives (the bytes
        the meter counted for it), including frames that arrive after the answer was given up.
        With `stats`, stats["wire_bytes"] adds up the bytes of the frames this call consumed,
        for the anomaly alerts."""
        if self._writer is None or self._dead is not None:
            await self._connect()
        assert self.hello is not None
        theirs = self.hello.weak_fingerprint
        if not weak_fingerprint.startswith(theirs) or not theirs:
            raise ModelMismatch(expected=weak_fingerprint, got=theirs)
        slot = next((s for s in range(self.max_streams) if s not in self._streams), None)
        if slot is None:
            raise UpstreamUnavailable("too many answers in flight on the inside connection; retry later")
        st = _Stream(asyncio.Queue(), on_bytes=on_bytes)
        self._streams[slot] = st
        decoder = self.codecs.decoder(req.codec, req.prompt_ids, req.seed, req.temperature, req.top_p)
        finished = False
        try:
            self._send(encode_frame(Kind.REQUEST, slot, req.to_bytes()))
            while True:
                item = await st.queue.get()
                if isinstance(item, ExfilguardError):
                    finished = True
                    raise item
                if stats is not None:
                    stats["wire_bytes"] = stats.get("wire_bytes", 0) + _frame_size(item)
                if item.kind == Kind.FAIL:
                    finished = True
                    code = parse_fail(item.payload)
                    raise _fail_error(code)
                if item.kind == Kind.RESEND:
                    raise FrameCorrupt("protocol: RESEND that was not asked for")
                try:
                    toks = await self._decode(decoder.push, item.payload)
                except Desync as d:
                    toks = await self._resend(slot, st, decoder, d.chunk_index)
                if item.kind == Kind.END:
                    finished = True
                    toks = toks + await self._decode(decoder.finish)
                    if toks:
                        self.tokens_in += len(toks)
                        yield toks
                    return
                if toks:
                    self.tokens_in += len(toks)
                    yield toks
        finally:
            if finished:
                self._streams.pop(slot, None)
            elif slot in self._streams:
                st.draining = True
                try:
                    self._send(encode_frame(Kind.CANCEL, slot))
                except ExfilguardError:
                    self._streams.pop(slot, None)
                else:
                    # Frames already on their way still cross the meter for this answer: wait for
                    # its END/FAIL (one inside step), so the caller's count of its bytes is whole.
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(st.freed.wait(), self.drain_timeout)

    async def _resend(self, slot: int, st: _Stream, decoder: Any, index: int) -> list[int]:
        """Ask for chunk `index` raw after a Desync; frames arriving meanwhile wait their turn."""
        self._send(encode_frame(Kind.RESEND_REQUEST, slot, encode_varint(index)))
        held: list[Frame] = []
        while True:
            item = await st.queue.get()
            if isinstance(item, ExfilguardError):
                raise item
            if item.kind == Kind.RESEND:
                got, raw = parse_resend(item.payload)
                if got != index:
                    raise FrameCorrupt(f"protocol: RESEND of chunk {got}, asked for {index}")
                toks = await self._decode(decoder.push_raw, index, raw)
                # Put back what arrived while we waited, in order, ahead of anything newer.
                rest = [st.queue.get_nowait() for _ in range(st.queue.qsize())]
                for x in held + rest:
                    st.queue.put_nowait(x)
                return toks
            held.append(item)


def _frame_size(f: Frame) -> int:
    """Bytes this frame took on the wire."""
    return len(encode_frame(f.kind, f.slot, f.payload))


def _fail_error(code: FailCode) -> ExfilguardError:
    if code == FailCode.BAD_REQUEST:
        return RequestInvalid("the inside refused the request as malformed", None)
    if code == FailCode.OVERLOADED:
        return UpstreamUnavailable("the inside worker is overloaded; retry later")
    if code == FailCode.UNSUPPORTED_CODEC:
        return UpstreamUnavailable("the inside worker does not support the requested codec")
    if code == FailCode.CANCELLED:
        return UpstreamUnavailable("the inside worker cancelled the answer (shutting down?)")
    return UpstreamUnavailable("the inside worker failed while generating; retry later")


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
