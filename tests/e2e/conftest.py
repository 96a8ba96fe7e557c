"""Session fixtures: SmolLM2 loaded once; one stack for every e2e test that does not break it."""

from __future__ import annotations

import pytest
from e2estack import Stack


@pytest.fixture(scope="session")
def models():
    from exfilguard.models.loading import load_models, resolve_weak_spec

    weak_spec = resolve_weak_spec(None, "smollm2")
    return load_models("smollm2", weak_spec, progress=False)


@pytest.fixture(scope="session")
def stack(models, tmp_path_factory):
    s = Stack(models[0], models[1], tmp_path_factory.mktemp("e2e"))
    yield s
    s.close()
