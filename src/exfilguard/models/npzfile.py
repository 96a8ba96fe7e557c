"""The .npz files `exfilguard distill` writes: a JSON `meta` entry (with a `format` tag) beside
the arrays. One reader for every kind, so each fails on a bad file with the same clear error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from exfilguard.errors import ConfigError


def read_model_npz(path: str | Path, kind: str, fmt: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, every other array) of a `kind` file ("n-gram", "student") in format `fmt`;
    ConfigError naming the file when it is not one."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not an exfilguard {kind} file ({exc})") from exc
    with z:
        meta = json.loads(bytes(z["meta"]).decode())
        if meta.get("format") != fmt:
            raise ConfigError(f"{path}: unknown {kind} format {meta.get('format')!r}")
        return meta, {k: z[k] for k in z.files if k != "meta"}
