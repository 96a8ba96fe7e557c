"""Run the pieces: the inside worker, the outside API, and all three with a meter (`up`).

The CLI calls these; tests and the benchmark start the same stacks in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from exfilguard.outside.app import OutsideConfig, create_app
from exfilguard.outside.client import InsideConnection, StatusProbe, no_probe
from exfilguard.protocol.streams import CodecFactory

log = logging.getLogger(__name__)


def parse_hostport(s: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'HOST:PORT' or ':PORT' or 'PORT' -> (host, port)."""
    from exfilguard.errors import ConfigError

    host, sep, port = s.rpartition(":")
    if not sep:
        host, port = "", s
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"expected HOST:PORT, got {s!r}") from None
    if not 0 <= p < 65536:
        raise ConfigError(f"port out of range in {s!r}")
    return host or default_host, p


def make_backend(strong: Any, max_batch: int = 64) -> Any:
    """The backend for a loaded strong model: continuous batching for transformers models,
    an upstream server for an `openai:URL` spec (given as the string)."""
    from exfilguard.inside.engine import LocalEngine

    if isinstance(strong, str):
        from exfilguard.inside.upstream import OpenAIUpstream

        return OpenAIUpstream(strong)

    return LocalEngine(strong, max_batch=max_batch)


async def start_inside(backend: Any, codecs: CodecFactory, tokenizer: Any, vocab_size: int | None,
                       host: str = "127.0.0.1", port: int = 0) -> Any:
    """Start an InsideServer; return it (its `.port` is the bound port)."""
    from exfilguard.inside.server import InsideConfig, InsideServer

    srv = InsideServer(backend, codecs, tokenizer, vocab_size, InsideConfig(host=host, port=port))
    srv.port = await srv.start()
    return srv


class UvicornThreadless:
    """A uvicorn server run as a task in the current event loop."""

    def __init__(self, app: Any, host: str, port: int):
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(self.config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("uvicorn stopped during startup")
            await asyncio.sleep(0.02)
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 10)


async def start_outside(codecs: CodecFactory, tokenizer: Any, weak_fingerprint: str, api_keys: list[str],
                        inside_host: str, inside_port: int, probe: StatusProbe = no_probe,
                        host: str = "127.0.0.1", port: int = 0, config: OutsideConfig | None = None) -> tuple[UvicornThreadless, int]:
    """Start the API; return (server, bound port)."""
    conn = InsideConnection(inside_host, inside_port, codecs, probe)
    app = create_app(conn, tokenizer, weak_fingerprint, api_keys, config)
    srv = UvicornThreadless(app, host, port)
    return srv, await srv.start()


@dataclass
class LoopThread:
    """An asyncio loop in a background thread, for running servers next to blocking code."""

    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self.loop.run_forever, name="exfilguard-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any], timeout: float | None = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self.thread is not None:
            self.thread.join(timeout=10)


MeterStarter = Callable[[int], Awaitable[tuple[int, StatusProbe, Callable[[], Awaitable[None]]]]]


# ---------------------------------------------------------------- model loading and sizes


def load_models(strong_spec: str | None, weak_spec: str, device: str = "cpu", progress: bool = True) -> tuple[Any, Any]:
    """Load the strong model (None for none) and the weak model, with a progress bar.

    A weak spec equal to the strong spec reuses the loaded strong model (one copy in memory)."""
    from exfilguard.models import load_model

    steps = [s for s in (strong_spec, weak_spec if weak_spec != strong_spec else None) if s]
    strong = weak = None
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  disable=not progress, transient=False) as bar:
        task = bar.add_task("loading models", total=len(steps))
        if strong_spec:
            bar.update(task, description=f"loading strong model {strong_spec}")
            strong = _load_strong(strong_spec, device)
            bar.advance(task)
        if weak_spec == strong_spec and strong is not None and not isinstance(strong, str):
            weak = strong
        else:
            bar.update(task, description=f"loading weak model {weak_spec}")
            weak = load_model(weak_spec)
            bar.advance(task)
        bar.update(task, description="models loaded")
    return strong, weak


def _load_strong(spec: str, device: str) -> Any:
    from exfilguard.models import load_model

    if spec.startswith("openai:"):
        return spec  # an upstream server: nothing to load here
    return load_model(spec, device=device)


def resolve_weak_spec(weak: str | None, strong: str) -> str:
    """The weak model to use: the one asked for, else the shipped `default` student if present,
    else the strong model itself (printed as a warning by the CLI)."""
    if weak:
        return weak
    try:
        from exfilguard.models.specs import _ensure_builtin_kinds, _EXTRA_KINDS

        _ensure_builtin_kinds()
        if "default" in _EXTRA_KINDS:
            from exfilguard.models.student import DEFAULT_STUDENT

            if DEFAULT_STUDENT.is_file():
                return "default"
    except Exception:  # a half-written distill module must not stop serving
        pass
    return "smollm2" if strong.startswith("openai:") else strong


def weight_file_bytes(strong_spec: str) -> int | None:
    """Size on disk of the strong model's weight files (None when unknown, e.g. openai:)."""
    from pathlib import Path

    if strong_spec == "smollm2":
        from exfilguard.models.specs import SMOLLM2_GGUF, smollm2_path

        return (smollm2_path() / SMOLLM2_GGUF).stat().st_size
    if strong_spec.startswith("hf:"):
        path = Path(strong_spec[3:].partition("?")[0])
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".gguf", ".pt")]
        return sum(p.stat().st_size for p in files) or None
    return None


# ---------------------------------------------------------------- long-running commands


async def _wait_for_signal() -> None:
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _tokenizer_of(strong: Any, weak: Any) -> Any:
    for m in (strong, weak):
        tok = getattr(m, "tokenizer", None)
        if tok is not None:
            return tok
    from exfilguard.models.hf import load_tokenizer

    return load_tokenizer()


def serve_inside(strong_spec: str, weak_spec: str, listen: str, device: str = "cpu", max_batch: int = 64) -> None:
    """`exfilguard inside`: load both models, serve until SIGINT/SIGTERM."""
    from exfilguard.protocol.codec_adapter import RealCodecFactory

    host, port = parse_hostport(listen)
    strong, weak = load_models(strong_spec, weak_spec, device)
    codecs = RealCodecFactory(weak)
    tok = _tokenizer_of(strong, weak)
    vocab = None if isinstance(strong, str) else strong.info.vocab_size

    async def main() -> None:
        srv = await start_inside(make_backend(strong, max_batch), codecs, tok, vocab, host, port)
        print(f"inside worker listening on {host}:{srv.port} (strong {strong_spec}, weak {weak_spec} {codecs.weak_fingerprint[:12]})", flush=True)
        try:
            await _wait_for_signal()
        finally:
            await srv.stop()

    asyncio.run(main())


def serve_outside(inside: str, weak_spec: str, listen: str, api_keys_file: str | None, meter_status: str | None,
                  config: OutsideConfig) -> None:
    """`exfilguard outside`: load the weak model, serve the API until SIGINT/SIGTERM."""
    from exfilguard.outside.app import read_api_keys
    from exfilguard.outside.client import http_status_probe
    from exfilguard.protocol.codec_adapter import RealCodecFactory

    ihost, iport = parse_hostport(inside)
    host, port = parse_hostport(listen)
    if api_keys_file is None and not config.keys_ledger:
        from exfilguard.errors import ConfigError

        raise ConfigError("no API keys: pass --api-keys FILE and/or --keys-ledger URL (exfilguard keys add makes keys)")
    keys = read_api_keys(api_keys_file) if api_keys_file else []
    _, weak = load_models(None, weak_spec)
    codecs = RealCodecFactory(weak)
    probe = http_status_probe(meter_status) if meter_status else no_probe

    async def main() -> None:
        srv, bound = await start_outside(codecs, _tokenizer_of(None, weak), codecs.weak_fingerprint, keys,
                                         ihost, iport, probe, host, port, config)
        print(f"outside API on http://{host}:{bound}/v1 (inside via {ihost}:{iport})", flush=True)
        try:
            await _wait_for_signal()
        finally:
            await srv.stop()

    asyncio.run(main())


# ---------------------------------------------------------------- the meter, as its own process


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MeterProcess:
    """`exfilguard meter` in a subprocess: the trusted base keeps its own address space."""

    upstream_port: int
    ledger_url: str
    cap: int
    port: int = 0
    status_port: int = 0
    signing_key: Any = None  # Path of an Ed25519 key: the meter signs tree heads with it
    proc: Any = None

    def start(self, timeout: float = 30.0) -> None:
        import socket
        import subprocess
        import sys
        import time

        self.port = self.port or free_port()
        self.status_port = self.status_port or free_port()
        cmd = [sys.executable, "-m", "exfilguard.cli.main", "meter",
               "--listen", f"127.0.0.1:{self.port}", "--upstream", f"127.0.0.1:{self.upstream_port}",
               "--ledger", self.ledger_url, "--cap", str(self.cap),
               "--metrics", f"127.0.0.1:{self.status_port}"]
        if self.signing_key is not None:
            cmd += ["--signing-key", str(self.signing_key)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the meter exited with status {self.proc.returncode} at startup")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the meter did not start listening in time")

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}/status"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:
                self.proc.kill()


def new_api_key(data_dir: Any) -> str:
    """The API key in DATA_DIR/api-keys: the first one there, else a new one (mode 0600).

    Reused across restarts, so `up` does not add a key at every start."""
    import os
    import secrets
    from pathlib import Path

    path = Path(data_dir) / "api-keys"
    if path.is_file():
        from exfilguard.outside.app import read_api_keys

        existing = read_api_keys(path)
        if existing:
            return existing[0]
    key = "sk-exfilguard-" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(key + "\n")
    return key


def meter_signing_key(ddir: "Any") -> "Any":
    """DATA_DIR/meter-key (made on first use, kept across restarts): the meter signs tree heads."""
    from exfilguard.ledger.keys import generate_keypair

    path = ddir / "meter-key"
    if not path.is_file():
        generate_keypair(path)
    return path


def serve_up(strong_spec: str, weak_spec: str | None, cap: int | None, port: int, data_dir: str,
             config: OutsideConfig, device: str = "cpu") -> None:
    """`exfilguard up`: meter + inside + outside on localhost, until Ctrl-C or SIGTERM."""
    from pathlib import Path

    from exfilguard.errors import ConfigError
    from exfilguard.outside.app import read_api_keys
    from exfilguard.outside.client import http_status_probe
    from exfilguard.protocol.codec_adapter import RealCodecFactory

    ddir = Path(data_dir)
    ddir.mkdir(parents=True, exist_ok=True)
    asked = weak_spec
    weak_spec = resolve_weak_spec(weak_spec, strong_spec)
    if asked is None and weak_spec == strong_spec:
        print(f"warning: no distilled weak model found; using the strong model {strong_spec} as the weak model", flush=True)
    if cap is None:
        size = weight_file_bytes(strong_spec)
        if size is None:
            raise ConfigError(f"cannot size the weights of {strong_spec!r}: pass --cap BYTES")
        cap = size // 10
    strong, weak = load_models(strong_spec, weak_spec, device)
    codecs = RealCodecFactory(weak)
    tok = _tokenizer_of(strong, weak)
    vocab = None if isinstance(strong, str) else strong.info.vocab_size
    key = new_api_key(ddir)
    keys = read_api_keys(ddir / "api-keys")
    signing_key = meter_signing_key(ddir)
    ledger_url = f"sqlite:///{(ddir / 'ledger.sqlite').resolve()}"
    config.model_name = strong_spec if not strong_spec.startswith("openai:") else "exfilguard"
    config.keys_ledger = config.keys_ledger or f"sqlite:///{(ddir / 'keys.sqlite').resolve()}"
    if not isinstance(strong, str):
        config.max_context = int(getattr(strong.model.config, "max_position_embeddings", config.max_context))

    async def main() -> None:
        inside = await start_inside(make_backend(strong), codecs, tok, vocab)
        meter = MeterProcess(inside.port, ledger_url, cap, signing_key=signing_key)
        await asyncio.to_thread(meter.start)
        outside = None
        config.meter_status_url = meter.status_url
        try:
            outside, bound = await start_outside(codecs, tok, codecs.weak_fingerprint, keys, "127.0.0.1", meter.port,
                                                 http_status_probe(meter.status_url), "127.0.0.1", port, config)
            print(f"exfilguard is up: base URL http://127.0.0.1:{bound}/v1", flush=True)
            print(f"API key: {key}", flush=True)
            print(f"strong {strong_spec}, weak {weak_spec}, cap {cap} bytes, ledger {ddir / 'ledger.sqlite'} "
                  f"(tree heads signed with {signing_key}; audit: exfilguard ledger verify --ledger "
                  f"{ledger_url} --public-key {signing_key}.pub); Ctrl-C stops", flush=True)
            await _wait_for_signal()
        finally:
            print("stopping: outside, meter, inside", flush=True)
            if outside is not None:
                await outside.stop()
            await asyncio.to_thread(meter.stop)
            await inside.stop()

    asyncio.run(main())
