"""The inside on a CPU runs torch's OpenMP threads with OMP_WAIT_POLICY=PASSIVE (inside/serve.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _policy(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**base, **env})
    return out.stdout.strip()


@pytest.mark.parametrize(
    "code,env,want",
    [
        # before torch loads, on a CPU: set, and libgomp reads it when torch loads
        ("from exfilguard.inside.serve import passive_openmp as p; print(p('cpu'))", {}, "True"),
        # the operator's choice stands
        ("from exfilguard.inside.serve import passive_openmp as p; print(p('cpu'))", {"OMP_WAIT_POLICY": "ACTIVE"}, "False"),
        # a GPU strong model: left alone
        ("from exfilguard.inside.serve import passive_openmp as p; print(p('cuda'))", {}, "False"),
        # too late once torch is loaded: not pretended
        ("import torch; from exfilguard.inside.serve import passive_openmp as p; print(p('cpu'))", {}, "False"),
    ],
)
def test_passive_openmp(code: str, env: dict[str, str], want: str) -> None:
    assert _policy(code, **env) == want
