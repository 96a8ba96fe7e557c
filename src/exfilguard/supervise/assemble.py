"""The pieces assembled in one process, for tests and benchmarks: an event loop in a thread to run
the inside's and the outside's servers next to blocking code, and the meter as its own process
(the trusted base keeps its own address space even here). `exfilguard up` assembles the same
pieces as supervised processes (supervise/up.py)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LoopThread:
    """An asyncio loop in a background thread, for running servers next to blocking code."""

    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self.loop.run_forever, name="exfilguard-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any], timeout: float | None = 120) -> Any:
        """Run a coroutine on the loop; wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self.thread is not None:
            self.thread.join(timeout=10)


@dataclass
class MeterProcess:
    """`exfilguard meter` in a subprocess, in front of an inside on 127.0.0.1:upstream_port."""

    upstream_port: int
    ledger_url: str
    cap: int
    port: int = 0
    status_port: int = 0
    signing_key: Path | None = None  # an Ed25519 key: the meter signs tree heads with it
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start the meter; return once it accepts connections (RuntimeError if it exits first)."""
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
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
