"""Settings for every test (tests/ and components/<step>/tests) and the component fixtures.

CPU only, quiet TensorFlow, no progress bars in captured output. This file sits at the
repository root, outside every package, so that nothing test-only ships in the wheel.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("QATFLOW_NO_PROGRESS", "1")
os.environ.setdefault(
    "MLFLOW_TRACKING_URI", "sqlite:///" + os.path.join(os.getcwd(), ".pytest-mlflow.db")
)

if TYPE_CHECKING:
    from tests.chain import Chain


@pytest.fixture(scope="session")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """A tiny real run of every step: dataset spec, models, ONNX, engines, results, report."""
    from tests.chain import build_chain  # after the settings above: it imports qatflow

    return build_chain(tmp_path_factory.mktemp("chain"))


@pytest.fixture
def pretrain_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty qatflow cache, so demo pretraining really runs."""
    monkeypatch.setenv("QATFLOW_CACHE_DIR", str(tmp_path / "cache"))
    yield tmp_path / "cache"
