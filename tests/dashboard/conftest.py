"""Fixtures for the dashboard tests: a real PostgreSQL cluster for tests marked postgres."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pgserver import PgServer, shared_pg  # noqa: E402


@pytest.fixture(scope="session")
def pg() -> PgServer:
    """The PostgreSQL server; failing to start it fails the test (never skips)."""
    return shared_pg()


@pytest.fixture
def pg_url(pg: PgServer) -> str:
    """A fresh database on the shared server."""
    return pg.create_db()
