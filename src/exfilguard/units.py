"""Parsers for the sizes, durations and rolling windows given on command lines (--cap 50MB, --window 1h=50MB).

Shared by every command; the meter itself takes bytes and seconds (MeterConfig), and a budget's
cap and windows, once created, are the ledger's (``Ledger.ensure_budget`` refuses others).
"""

from __future__ import annotations

import re

from exfilguard.errors import ConfigError
from exfilguard.ledger.accounting import Window

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
