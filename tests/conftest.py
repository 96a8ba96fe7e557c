"""Shared test fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pgserver import PgServer, shared_pg  # noqa: E402

SHARED_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "smollm2_corpus_dev.jsonl"
# The first 40 dev generations plus the first one at each other temperature, so a clone that is
# not next to ../shared still runs every corpus test (never skips them).
SAMPLE_DEV = Path(__file__).resolve().parent / "data" / "smollm2_corpus_dev_sample.jsonl"


@pytest.fixture(scope="session")
def dev_corpus() -> Path:
    """The dev corpus (../shared/data when the checkout sits next to it, else the bundled sample)."""
    return SHARED_DEV if SHARED_DEV.is_file() else SAMPLE_DEV


@pytest.fixture(scope="session")
def pg() -> PgServer:
    """The PostgreSQL server the test setup starts; failing to start it fails the test (never skips)."""
    return shared_pg()


@pytest.fixture
def pg_url(pg: PgServer) -> str:
    """A fresh database on the shared server."""
    return pg.create_db()
