"""The package-level API: lazy names, and quantized models that load without extra imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import keras
import pytest
from tests.model_zoo import small_cnn

import qatflow
from qatflow.quantization import QuantizeWrapper

STEP_FUNCTIONS = (
    "build_engine",
    "load_engine",
    "evaluate",
    "compare",
    "finetune",
    "load_dataset",
    "load_model",
    "pretrain",
)


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_qatflow_stays_light() -> None:
    loaded = _run("import sys, qatflow; print(sorted({'tensorflow', 'keras'} & set(sys.modules)))")
    assert loaded.strip() == "[]"


@pytest.mark.parametrize("name", STEP_FUNCTIONS)
def test_step_functions_are_package_functions(name: str) -> None:
    assert callable(getattr(qatflow, name)) and name in dir(qatflow)


def test_every_exported_name_resolves() -> None:
    missing = [name for name in qatflow._EXPORTS if not hasattr(qatflow, name)]
    assert missing == []
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = qatflow.nothing_here


@pytest.fixture(scope="module")
def quantized_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quantized") / "q.keras"
    qatflow.quantize_model(small_cnn()).save(path)
    return path


def test_load_model_registers_qatflows_layers_itself(quantized_file: Path) -> None:
    code = (
        "import qatflow; "
        f"model = qatflow.load_model({str(quantized_file)!r}); "
        "print(sorted({type(layer).__name__ for layer in model.layers}))"
    )
    assert "QuantizeWrapper" in _run(code)


def test_quantize_scope_loads_with_plain_keras(quantized_file: Path) -> None:
    with qatflow.quantize_scope():
        model = keras.saving.load_model(quantized_file, compile=False)
    assert any(isinstance(layer, QuantizeWrapper) for layer in model.layers)
