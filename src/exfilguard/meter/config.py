"""Meter configuration and the parsers of its addresses (sizes and durations from the command line: exfilguard.units)."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from exfilguard.base_errors import ConfigError
from exfilguard.ledger.accounting import Window

DEFAULT_BLOCK = 16 * 2**20  # the largest reservation block (--reserve-block): the ceiling of adaptive sizing
DEFAULT_MIN_BLOCK = 4 * 2**10  # the first block of a connection, and what an idle connection keeps reserved
DEFAULT_SETTLE_IDLE = 1.0  # seconds without a forwarded byte before a connection settles what it used


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


__all__ = ["DEFAULT_BLOCK", "DEFAULT_MIN_BLOCK", "DEFAULT_SETTLE_IDLE", "MeterConfig", "Window", "parse_hostport", "parse_upstream", "unix_socket"]
