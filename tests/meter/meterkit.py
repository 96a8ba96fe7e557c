"""Test helpers: a flooding upstream, pulling clients, and a meter run as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

CHUNK = bytes(range(256)) * 256  # 64 KiB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Flood(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while not self.server.stopping.is_set():  # type: ignore[attr-defined]
                self.request.sendall(CHUNK)
        except OSError:
            pass


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    request_queue_size = 256
    daemon_threads = True


class Upstream:
    """A threaded TCP server on 127.0.0.1: 'flood' sends forever, 'echo' echoes."""

    def __init__(self, kind: str = "flood"):
        handler = {"flood": _Flood, "echo": _Echo}[kind]
        self.server = _Server(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.server.stopping = threading.Event()  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.addr = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.stopping.set()  # type: ignore[attr-defined]
        self.server.shutdown()
        self.server.server_close()


async def pull(host: str, port: int, timeout: float = 60.0) -> int:
    """Connect, read until the meter closes the connection; return the bytes received."""
    n = 0
    try:
        r, w = await asyncio.open_connection(host, port)
    except OSError:
        return 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                b = await r.read(1 << 20)
                if not b:
                    break
                n += len(b)
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()
    return n


async def pull_many(host: str, port: int, clients: int, timeout: float = 60.0) -> list[int]:
    return list(await asyncio.gather(*[pull(host, port, timeout) for _ in range(clients)]))


def get_status(metrics_port: int, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/status", timeout=timeout) as resp:
        return json.loads(resp.read())


def get_metrics(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as resp:
        return resp.read().decode()


class MeterProcess:
    """`exfilguard meter` as a real subprocess, its log in a file."""

    def __init__(self, tmp: Path, ledger: str, upstream: str, cap: int | str, *extra: str, block: int = 16384, name: str = "meter"):
        self.port = free_port()
        self.metrics_port = free_port()
        self.log_path = Path(tmp) / f"{name}-{time.monotonic_ns()}.log"
        self.args = [
            sys.executable, "-m", "exfilguard.cli.main", "meter",
            "--listen", f"127.0.0.1:{self.port}", "--upstream", upstream, "--ledger", ledger,
            "--cap", str(cap), "--reserve-block", str(block), "--metrics", f"127.0.0.1:{self.metrics_port}",
            "--upstream-wait", "2", *extra,
        ]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"meter exited {self.proc.returncode}: {self.log()}")
            try:
                st = get_status(self.metrics_port, 0.5)
                if st["state"] in ("ok", "exhausted"):
                    return st
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"meter not ready after {timeout}s: {self.log()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()


def _replace(path: Path) -> None:
    """Put a copy of `path` at its path: same bytes, another inode."""
    tmp = path.with_name(path.name + ".copy")
    shutil.copyfile(path, tmp)
    os.replace(tmp, path)


# Faults to a SQLite ledger's files while a meter runs (`ledger.db` at `path`): name -> (do, undo).
FILE_FAULTS: dict[str, tuple[Callable[[Path], None], Callable[[Path], None]]] = {
    "chmod-db": (lambda p: os.chmod(p, 0o444), lambda p: os.chmod(p, 0o644)),
    "chmod-wal": (lambda p: os.chmod(f"{p}-wal", 0o444), lambda p: os.path.exists(f"{p}-wal") and os.chmod(f"{p}-wal", 0o644)),
    "chmod-dir": (lambda p: os.chmod(p.parent, 0o555), lambda p: os.chmod(p.parent, 0o755)),
    "rm-wal": (lambda p: os.remove(f"{p}-wal"), lambda p: None),
    "rm-shm": (lambda p: os.remove(f"{p}-shm"), lambda p: None),
    "replace-wal": (lambda p: _replace(Path(f"{p}-wal")), lambda p: None),
    "replace-db": (_replace, lambda p: None),
}
