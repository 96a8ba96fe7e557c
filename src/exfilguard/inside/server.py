"""The inside worker's network side: one asyncio server, many persistent connections.

Each connection starts with a HELLO from the inside; then the outside sends REQUEST / CANCEL /
RESEND_REQUEST frames and the inside answers with DATA ... END (or FAIL) per slot. Encoding
runs in the backend's thread, right where the tokens are made; frames are handed to the event
loop in order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from exfilguard.errors import ExfilguardError, FrameCorrupt, RequestInvalid
from exfilguard.inside.engine import Backend, Job
from exfilguard.protocol.streams import CodecFactory, StreamEncoder
from exfilguard.protocol.wire import (
    PROTOCOL_VERSION,
    FailCode,
    FrameReader,
    GenerationRequest,
    Hello,
    Kind,
    encode_frame,
    parse_chunk_index,
)

log = logging.getLogger(__name__)


@dataclass
class InsideConfig:
    """How the inside worker runs."""

    host: str = "127.0.0.1"
    port: int = 9100
    path: str | None = None  # listen on this UNIX socket instead of host:port (the sandboxed inside of `up`)
    max_slots_per_connection: int = 1024


class _Sink:
    """One job's tokens -> encoder -> DATA/END frames on its connection."""

    def __init__(self, conn: "_Connection", slot: int, req: GenerationRequest, encoder: StreamEncoder, tokenizer: Any):
        self.conn, self.slot, self.req, self.encoder = conn, slot, req, encoder
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.since_flush = 0
        self.last_flush = time.monotonic()
        self.lock = threading.Lock()
        self.ended = False

    def tokens(self, ids: Sequence[int]) -> bool:
        req = self.req
        with self.lock:
            if self.ended:
                return True
            for t in ids:
                self.encoder.push(int(t))
            self.ids.extend(int(t) for t in ids)
            self.since_flush += len(ids)
            now = time.monotonic()
            due = (req.flush_every and self.since_flush >= req.flush_every) or (
                req.flush_ms and (now - self.last_flush) * 1000.0 >= req.flush_ms
            )
            hit = False
            if req.stop and self.tokenizer is not None:
                # Only the tail can hold a new match: decode a window wide enough for any stop.
                tail = self.tokenizer.decode(self.ids[-64:], skip_special_tokens=True)
                hit = any(s in tail for s in req.stop)
            if due and not hit:
                data = self.encoder.flush()
                self.since_flush, self.last_flush = 0, now
                if data:
                    self.conn.send(encode_frame(Kind.DATA, self.slot, data))
            return hit

    def done(self, reason: str) -> None:
        with self.lock:
            if self.ended:
                return
            self.ended = True
            if reason in ("stop", "length"):
                try:
                    data = self.encoder.finish()
                except Exception:
                    log.exception("encoder.finish failed")
                    self.conn.send(encode_frame(Kind.FAIL, self.slot, bytes([FailCode.INTERNAL])))
                else:
                    self.conn.send(encode_frame(Kind.END, self.slot, data))
            else:
                code = FailCode.CANCELLED if reason == "cancelled" else FailCode.INTERNAL
                self.conn.send(encode_frame(Kind.FAIL, self.slot, bytes([code])))
            self.conn.finished(self.slot, self)


class _Connection:
    def __init__(self, server: "InsideServer", reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server, self.reader, self.writer = server, reader, writer
        self.loop = asyncio.get_running_loop()
        self.jobs: dict[int, Job] = {}
        self.done_encoders: dict[int, StreamEncoder] = {}  # kept for RESEND until the slot is reused
        self.closed = False

    def send(self, data: bytes) -> None:
        """Thread-safe, ordered write."""
        if threading.get_ident() == self.server.loop_thread:
            self._write(data)
        else:
            self.loop.call_soon_threadsafe(self._write, data)

    def _write(self, data: bytes) -> None:
        if not self.closed and not self.writer.is_closing():
            self.writer.write(data)

    def finished(self, slot: int, sink: _Sink) -> None:
        def _f() -> None:
            job = self.jobs.get(slot)
            if job is not None and job.sink is sink:
                del self.jobs[slot]
                self.done_encoders[slot] = sink.encoder

        self.loop.call_soon_threadsafe(_f)

    async def run(self) -> None:
        srv = self.server
        hello = Hello(PROTOCOL_VERSION, srv.backend.name, srv.codecs.weak_fingerprint[:16])
        frames = FrameReader("downstream")
        greeted = False
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                if not greeted:
                    # HELLO crosses the cap, so it waits for the outside's first frame: a
                    # health probe that connects and leaves costs no budget.
                    greeted = True
                    self._write(encode_frame(Kind.HELLO, 0, hello.to_bytes()))
                for f in frames.feed(data):
                    self._handle(f.kind, f.slot, f.payload)
                await self.writer.drain()
        except (FrameCorrupt, ConnectionError) as exc:
            log.warning("closing connection: %s", exc)
        finally:
            self.closed = True
            for job in self.jobs.values():
                job.cancel()
            self.writer.close()

    def _handle(self, kind: Kind, slot: int, payload: bytes) -> None:
        srv = self.server
        if kind == Kind.REQUEST:
            if slot in self.jobs:
                raise FrameCorrupt(f"protocol: REQUEST on busy slot {slot}")
            self.done_encoders.pop(slot, None)
            if len(self.jobs) >= srv.config.max_slots_per_connection:
                self._write(encode_frame(Kind.FAIL, slot, bytes([FailCode.OVERLOADED])))
                return
            try:
                req = GenerationRequest.from_bytes(payload, srv.vocab_size)
            except RequestInvalid:
                self._write(encode_frame(Kind.FAIL, slot, bytes([FailCode.BAD_REQUEST])))
                return
            if req.codec not in srv.codecs.names:
                self._write(encode_frame(Kind.FAIL, slot, bytes([FailCode.UNSUPPORTED_CODEC])))
                return
            try:
                enc = srv.codecs.encoder(req.codec, req.prompt_ids, req.seed, req.temperature, req.top_p)
            except ExfilguardError:
                self._write(encode_frame(Kind.FAIL, slot, bytes([FailCode.INTERNAL])))
                return
            job = Job(req, _Sink(self, slot, req, enc, srv.tokenizer))
            self.jobs[slot] = job
            srv.backend.submit(job)
        elif kind == Kind.CANCEL:
            job = self.jobs.get(slot)
            if job is not None:
                job.cancel()
        elif kind == Kind.RESEND_REQUEST:
            idx = parse_chunk_index(payload)
            job = self.jobs.get(slot)
            enc = job.sink.encoder if job is not None else self.done_encoders.get(slot)  # type: ignore[attr-defined]
            if enc is None:
                raise FrameCorrupt(f"protocol: RESEND_REQUEST for unknown slot {slot}")
            from exfilguard.protocol.wire import encode_varint

            self._write(encode_frame(Kind.RESEND, slot, encode_varint(idx) + enc.raw_chunk(idx)))


class InsideServer:
    """Serves a backend (strong model) and a codec factory (weak model) on a TCP port."""

    def __init__(self, backend: Backend, codecs: CodecFactory, tokenizer: Any, vocab_size: int | None, config: InsideConfig):
        self.backend, self.codecs, self.tokenizer = backend, codecs, tokenizer
        self.vocab_size = vocab_size
        self.config = config
        self.loop_thread = 0
        self._server: asyncio.base_events.Server | None = None
        self.connections: set[_Connection] = set()

    async def start(self) -> int:
        """Start listening; return the bound port (0 on a UNIX socket)."""
        self.loop_thread = threading.get_ident()
        self.backend.start()
        if self.config.path is not None:
            # A stale socket from a previous run of the same path is replaced (asyncio removes it).
            self._server = await asyncio.start_unix_server(self._on_connect, self.config.path)
            return 0
        self._server = await asyncio.start_server(self._on_connect, self.config.host, self.config.port)
        return int(self._server.sockets[0].getsockname()[1])

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for c in list(self.connections):
                c.writer.close()
            await self._server.wait_closed()
        await asyncio.to_thread(self.backend.stop)

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        await self._server.serve_forever()
