"""The SQLite ledger's files are watched as a whole: deleting, replacing or write-protecting the main
file, its -wal or -shm, or making the directory unwritable cuts every connection (fail closed), and
after a kill -9 the ledger counts at least every byte the client received (0 under-counted)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from meterkit import FILE_FAULTS, MeterProcess, Upstream

from exfilguard.ledger import open_ledger
from exfilguard.ledger import reads


async def _read_until_cut(port: int, at_least: int, fault, timeout: float = 30.0) -> tuple[int, bool]:
    """Read `at_least` bytes, apply the fault, read until the meter closes the connection: (bytes, cut)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    n = 0
    while n < at_least:
        b = await r.read(1 << 16)
        assert b, "closed before the fault"
        n += len(b)
    fault()
    cut = False
    try:
        async with asyncio.timeout(timeout):
            while b := await r.read(1 << 20):
                n += len(b)
        cut = True
    except (ConnectionError, OSError):
        cut = True
    except TimeoutError:
        pass
    w.close()
    return n, cut


_HOLD = "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1]); c.execute('SELECT COUNT(*) FROM events').fetchone(); print('open', flush=True); time.sleep(600)"


@pytest.mark.parametrize("fault", ["rm-wal", "rm-shm", "replace-wal", "chmod-wal", "chmod-dir", "replace-db"])
def test_a_ledger_file_fault_cuts_and_nothing_is_under_counted(tmp_path, fault):
    flood = Upstream("flood")
    d = tmp_path / "ledger"
    d.mkdir()
    path = d / "ledger.db"
    do, undo = FILE_FAULTS[fault]
    # 64 KiB blocks: the connection commits a reservation every 64 KiB, as the fault lands
    m = MeterProcess(tmp_path, f"sqlite:///{path}", flood.addr, 10**12, "--min-block", "65536", block=65536)
    other = None
    try:
        m.wait_ready()
        # Another process holds the ledger open too (the outside, a dashboard), so that closing the
        # meter's connection checkpoints nothing by itself; it is killed too.
        other = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE)
        assert other.stdout is not None and other.stdout.readline() == b"open\n"
        got, cut = asyncio.run(_read_until_cut(m.port, 2_000_000, lambda: do(path)))
        assert cut, f"the meter kept forwarding after {fault}"
        time.sleep(0.5)
        log = m.log()
        assert "LEDGER UNAVAILABLE, failing closed" in log
        assert ("read-only" if fault.startswith("chmod") else "gone" if fault.startswith("rm") else "replaced") in log
        m.kill()  # a crash right after: what it committed must be in the file at the path
        other.kill()
    finally:
        undo(path)
        m.stop()
        flood.close()
        if other is not None:
            other.kill()
            other.wait()
    led = open_ledger(f"sqlite:///{path}", create=False)
    reserved = reads.status(led, "default").reserved_bytes
    led.close()
    if fault == "replace-db":
        return  # a file put in the ledger's place is a rollback: signed heads published outside catch it
    assert got <= reserved, f"{fault}: the client got {got} bytes, the ledger counts {reserved}"


def test_the_meter_resumes_when_the_files_are_whole_again(tmp_path):
    flood = Upstream("flood")
    path = tmp_path / "ledger.db"
    m = MeterProcess(tmp_path, f"sqlite:///{path}", flood.addr, 10**12, block=65536)
    try:
        m.wait_ready()
        os.chmod(f"{path}-wal", 0o444)
        deadline = time.monotonic() + 20
        while "LEDGER UNAVAILABLE" not in m.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.chmod(f"{path}-wal", 0o644)
        while "forwarding resumes" not in m.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "forwarding resumes" in m.log()
    finally:
        m.stop()
        flood.close()
