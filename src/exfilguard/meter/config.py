"""Meter configuration and the parsers for its command-line values."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from exfilguard.errors import ConfigError
from exfilguard.ledger.accounting import Window

DEFAULT_BLOCK = 16 * 2**20  # the largest reservation block (--reserve-block): the ceiling of adaptive sizing
DEFAULT_MIN_BLOCK = 4 * 2**10  # the first block of a connection, and what an idle connection keeps reserved
DEFAULT_SETTLE_IDLE = 1.0  # seconds without a forwarded byte before a connection settles what it used

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(text: str, what: str = "size") -> int:
    """Parse a byte count: 1000, 64KiB, 50MB (decimal), 2GiB (binary); raise ConfigError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(f"{what} {text!r} is not a number of bytes (examples: 1000000, 64KiB, 50MB, 2GiB)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_duration(text: str) -> int:
    """Parse a duration in whole seconds: 90, 90s, 15m, 1h, 1d, 1w."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", str(text))
    if not m or int(m.group(1)) <= 0:
        raise ConfigError(f"duration {text!r} is not a positive duration (examples: 90s, 15m, 1h, 1d)")
    return int(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def parse_window(text: str) -> Window:
    """Parse DURATION=BYTES, e.g. 1h=50MB."""
    if "=" not in text:
        raise ConfigError(f"window {text!r} is not DURATION=BYTES (example: 1h=50MB)")
    d, b = text.split("=", 1)
    return Window(parse_duration(d), parse_size(b, "window limit"))


def parse_upstream(text: str, what: str = "--upstream") -> tuple[str, int] | str:
    """Parse HOST:PORT, or unix:PATH (a UNIX socket, e.g. a sandboxed inside's) as its PATH."""
    if str(text).startswith("unix:"):
        path = str(text)[len("unix:") :]
        if not path or "\0" in path:
            raise ConfigError(f"{what} {text!r} is not unix:PATH")
        return path
    return parse_hostport(text, what)


def unix_socket(path: str) -> str:
    """`path` if it is a UNIX socket itself (not a symlink to one); else ConfigError.

    The inside can write the directory its socket lives in: a symlink there must not redirect
    the meter to some other socket.
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        raise ConfigError(f"upstream socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"upstream {path} is not a UNIX socket" + (" (a symlink)" if stat.S_ISLNK(mode) else ""))
    return path


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """Parse HOST:PORT (IPv6 as [::1]:PORT)."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\s]+):(\d+)", str(text).strip())
    if not m:
        raise ConfigError(f"{what} {text!r} is not HOST:PORT")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what} {text!r} has a port out of range")
    return host, port


@dataclass
class MeterConfig:
    """Everything a meter needs. Sizes in bytes, times in seconds."""

    listen: str
    upstream: str  # HOST:PORT or unix:PATH
    ledger: str
    cap: int
    budget: str = "default"
    windows: tuple[Window, ...] = ()
    reserve_block: int = DEFAULT_BLOCK  # the ceiling of a reservation block; == min_block for a fixed size
    min_block: int = DEFAULT_MIN_BLOCK  # the first block; capped at reserve_block
    settle_idle: float = DEFAULT_SETTLE_IDLE  # idle seconds before a connection settles and returns the rest
    signing_key: Path | None = None
    metrics: str | None = None
    sth_interval: float = 30.0  # seconds between signed tree heads (when the log grew)
    upstream_wait: float = 5.0  # at start, how long to wait for the upstream; 0 skips the check
    health_interval: float = 0.25  # how often the ledger is probed with a write (the kill switch's delay)
    probe_timeout: float = 5.0  # a write probe slower than this counts as a ledger failure
    upstream_connect_timeout: float = 5.0
    publish_heads: str | None = None  # DIR, http(s)://URL or "-": where every signed head also goes
    # Count timing as egress (blocks.py): each connection's open and close, and each upstream read
    # shorter than EVENT_MIN, are charged a fixed minimum in the ledger.
    timing_charge: bool = False

    @property
    def first_block(self) -> int:
        """The size of a connection's first block: min_block, never above the ceiling."""
        return min(self.min_block, self.reserve_block)

    def validate(self) -> None:
        """Raise ConfigError when a value cannot work."""
        parse_hostport(self.listen, "--listen")
        parse_upstream(self.upstream)
        if self.metrics:
            parse_hostport(self.metrics, "--metrics")
        if not isinstance(self.cap, int) or self.cap < 0:
            raise ConfigError(f"--cap {self.cap!r} must be a non-negative number of bytes")
        if not isinstance(self.reserve_block, int) or self.reserve_block <= 0:
            raise ConfigError(f"--reserve-block {self.reserve_block!r} must be a positive number of bytes")
        if not isinstance(self.min_block, int) or self.min_block <= 0:
            raise ConfigError(f"--min-block {self.min_block!r} must be a positive number of bytes")
        if not isinstance(self.settle_idle, (int, float)) or not 0 < self.settle_idle <= 3600:
            raise ConfigError(f"--settle-idle {self.settle_idle!r} must be a number of seconds in (0, 3600]")
        if not self.budget or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", self.budget):
            raise ConfigError(f"--budget {self.budget!r} must be 1-64 letters, digits or _.:-")
        secs = [w.seconds for w in self.windows]
        if len(set(secs)) != len(secs):
            raise ConfigError("two --window options have the same duration")
        if self.signing_key is not None and not Path(self.signing_key).is_file():
            raise ConfigError(
                f"signing key {self.signing_key} does not exist; make one with `exfilguard keys new --out {self.signing_key}`"
            )


__all__ = ["DEFAULT_BLOCK", "DEFAULT_MIN_BLOCK", "DEFAULT_SETTLE_IDLE", "MeterConfig", "Window", "parse_duration", "parse_hostport", "parse_size", "parse_upstream", "unix_socket", "parse_window"]
