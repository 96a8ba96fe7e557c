"""The inside's entry point: `exfilguard inside` loads the strong and the weak model and serves the
protocol on HOST:PORT or on a UNIX socket (how the sandboxed inside of `exfilguard up` is reached).

Tests and benchmarks start the same server in-process with `make_backend` and `start_inside`.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from exfilguard.endpoint import Endpoint, parse_endpoint, wait_for_signal
from exfilguard.inside.engine import Backend
from exfilguard.inside.server import InsideConfig, InsideServer
from exfilguard.protocol.streams import CodecFactory


def make_backend(strong: Any, max_batch: int = 64) -> Backend:
    """The backend for a loaded strong model: continuous batching for transformers models,
    an upstream server for an `openai:URL` spec (given as the string)."""
    if isinstance(strong, str):
        from exfilguard.inside.upstream import OpenAIUpstream

        return OpenAIUpstream(strong)
    from exfilguard.inside.engine import LocalEngine

    return LocalEngine(strong, max_batch=max_batch)


async def start_inside(backend: Backend, codecs: CodecFactory, tokenizer: Any, vocab_size: int | None,
                       host: str = "127.0.0.1", port: int = 0, path: str | None = None) -> InsideServer:
    """Start an InsideServer on host:port (or the UNIX socket `path`); return it (`.port` is the bound port)."""
    srv = InsideServer(backend, codecs, tokenizer, vocab_size, InsideConfig(host=host, port=port, path=path))
    srv.port = await srv.start()  # type: ignore[attr-defined]
    return srv


def passive_openmp(device: str) -> bool:
    """On a CPU, before torch loads: OpenMP threads that sleep when idle (OMP_WAIT_POLICY=PASSIVE).

    The strong model's OpenMP threads spin between kernels by default, holding the cores that
    the sampler and the coupled encoders need between steps; sleeping threads serve the whole
    inside faster (bench/serve_bench.py, 8 requests of 128 tokens, `coupled` flushing every 16:
    63.1 tok/s against 46.7 with spinning threads). A value the operator set is kept. Whether
    the policy is now PASSIVE."""
    if device == "cpu" and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


def serve_inside(strong_spec: str, weak_spec: str, listen: str, device: str = "cpu", max_batch: int = 64) -> None:
    """`exfilguard inside`: load both models, serve until SIGINT/SIGTERM."""
    passive_openmp(device)
    from exfilguard.models.loading import load_models, tokenizer_of
    from exfilguard.protocol.codec_adapter import RealCodecFactory

    where = parse_endpoint(listen)
    strong, weak = load_models(strong_spec, weak_spec, device)
    codecs = RealCodecFactory(weak)
    tok = tokenizer_of(strong, weak)
    vocab = None if isinstance(strong, str) else strong.info.vocab_size

    async def main() -> None:
        srv = await start_inside(make_backend(strong, max_batch), codecs, tok, vocab, where.host, where.port, where.path)
        bound = where if where.path is not None else Endpoint(where.host, srv.port)  # type: ignore[attr-defined]
        print(f"inside worker listening on {bound} (strong {strong_spec}, weak {weak_spec} {codecs.weak_fingerprint[:12]})", flush=True)
        try:
            await wait_for_signal()
        finally:
            await srv.stop()

    asyncio.run(main())
