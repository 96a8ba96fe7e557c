"""Bad configuration -> a clear error and a non-zero exit; the meter imports no ML library."""

from __future__ import annotations

import subprocess
import sys

import pytest
from meterkit import Upstream, free_port

from exfilguard.errors import ConfigError
from exfilguard.units import parse_duration, parse_size, parse_window

EXFILGUARD = [sys.executable, "-m", "exfilguard.cli.main"]


def _meter(tmp_path, *args: str, upstream: str = "127.0.0.1:9", ledger: str | None = None, cap: str = "1MB"):
    cmd = [*EXFILGUARD, "meter", "--listen", f"127.0.0.1:{free_port()}", "--upstream", upstream,
           "--ledger", ledger or f"sqlite:///{tmp_path}/ledger.db", "--cap", cap, "--upstream-wait", "0.3", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def upstream():
    up = Upstream("echo")
    yield up.addr
    up.close()


def test_cap_not_a_number(tmp_path, upstream):
    out = _meter(tmp_path, cap="lots", upstream=upstream)
    assert out.returncode == 2
    assert "--cap 'lots' is not a number of bytes" in out.stderr


def test_unreachable_upstream(tmp_path):
    out = _meter(tmp_path, upstream=f"127.0.0.1:{free_port()}")
    assert out.returncode == 6
    assert "is unreachable" in out.stderr


def test_unknown_ledger_scheme(tmp_path, upstream):
    out = _meter(tmp_path, upstream=upstream, ledger="mysql://localhost/ledger")
    assert out.returncode == 2
    assert "unknown ledger URL scheme 'mysql'" in out.stderr


def test_missing_key_file(tmp_path, upstream):
    out = _meter(tmp_path, "--signing-key", str(tmp_path / "absent.key"), upstream=upstream)
    assert out.returncode == 2
    assert "signing key" in out.stderr and "does not exist" in out.stderr


def test_bad_window_and_block(tmp_path, upstream):
    out = _meter(tmp_path, "--window", "1h", upstream=upstream)
    assert out.returncode == 2 and "DURATION=BYTES" in out.stderr
    out = _meter(tmp_path, "--reserve-block", "0", upstream=upstream)
    assert out.returncode == 2 and "--reserve-block" in out.stderr


def test_bad_min_block_and_settle_idle(tmp_path, upstream):
    out = _meter(tmp_path, "--min-block", "0", upstream=upstream)
    assert out.returncode == 2 and "--min-block 0 must be a positive number of bytes" in out.stderr
    out = _meter(tmp_path, "--min-block", "4KB2", upstream=upstream)
    assert out.returncode == 2 and "--min-block '4KB2' is not a number of bytes" in out.stderr
    out = _meter(tmp_path, "--settle-idle", "0", upstream=upstream)
    assert out.returncode == 2 and "--settle-idle 0.0 must be a number of seconds" in out.stderr


def test_bad_loop(tmp_path, upstream):
    out = _meter(tmp_path, "--loop", "trio", upstream=upstream)
    assert out.returncode == 2 and "--loop must be one of auto, asyncio, uvloop, not 'trio'" in out.stderr
    assert not (tmp_path / "ledger.db").exists()  # refused before the ledger was opened


def test_unreachable_postgres(tmp_path, upstream):
    out = _meter(tmp_path, upstream=upstream, ledger=f"postgresql://nobody@127.0.0.1:{free_port()}/x")
    assert out.returncode == 4
    assert "cannot connect to ledger" in out.stderr


def test_cap_change_on_restart_refused(tmp_path, upstream):
    from exfilguard.ledger import open_ledger

    open_ledger(f"sqlite:///{tmp_path}/ledger.db").ensure_budget("default", 1_000_000)
    out = _meter(tmp_path, upstream=upstream, cap="2MB")
    assert out.returncode == 2
    assert "refusing to start with --cap 2000000" in out.stderr and "signed k-of-n" in out.stderr


def test_parsers():
    assert parse_size("1000") == 1000
    assert parse_size("64KiB") == 65536
    assert parse_size("50MB") == 50_000_000
    assert parse_size("2gib") == 2 * 2**30
    for bad in ("", "-1", "1.5MB", "ten", "5XB"):
        with pytest.raises(ConfigError):
            parse_size(bad)
    assert parse_duration("90") == 90 and parse_duration("1h") == 3600 and parse_duration("1d") == 86400
    with pytest.raises(ConfigError):
        parse_duration("0s")
    w = parse_window("1h=50MB")
    assert (w.seconds, w.limit) == (3600, 50_000_000)


def test_meter_imports_no_ml_library():
    code = (
        "import sys, exfilguard.meter, exfilguard.ledger, exfilguard.cli.meter, exfilguard.cli.ledger, exfilguard.cli.keys\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy', 'constriction', 'gguf')\n"
        "             or m.startswith(('exfilguard.codec', 'exfilguard.models', 'exfilguard.inside', 'exfilguard.outside')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_every_command_has_help():
    for cmd in (["meter"], ["ledger", "status"], ["ledger", "verify"], ["keys", "new"]):
        out = subprocess.run([*EXFILGUARD, *cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "Usage" in out.stdout, cmd
