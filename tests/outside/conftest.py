"""Fixtures: a module-scoped tiny-random stack."""

from __future__ import annotations

import pytest
from tinystack import TinyStack


@pytest.fixture(scope="module")
def tiny_stack():
    s = TinyStack()
    yield s
    s.close()
