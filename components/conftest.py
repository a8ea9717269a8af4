"""Fixtures shared by the component tests (``components/<step>/tests``)."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import tests.conftest  # noqa: F401  (the repository-wide test environment: CPU, quiet, no bars)
from qatflow_components.testing import Chain, build_chain


@pytest.fixture(scope="session")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """A tiny real run of every step: dataset spec, models, ONNX, engines, results, report."""
    return build_chain(tmp_path_factory.mktemp("chain"))


@pytest.fixture
def pretrain_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty qatflow cache, so demo pretraining really runs."""
    monkeypatch.setenv("QATFLOW_CACHE_DIR", str(tmp_path / "cache"))
    yield tmp_path / "cache"
