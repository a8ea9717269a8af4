"""build_engine: an ONNX Runtime engine; a runtime this machine lacks leaves no engine."""

import contextlib
from pathlib import Path

import pytest
from kfp import dsl
from qatflow_components.build_engine.component import build_engine
from tests.chain import Chain, artifact

from qatflow.errors import QatflowError, RuntimeBackendError
from qatflow.runtimes import load_engine
from qatflow.runtimes.tensorrt_backend import import_tensorrt


def test_onnxruntime_engine(chain: Chain, tmp_path: Path) -> None:
    engine = artifact(dsl.Model, tmp_path / "engine")
    build_engine.python_func(
        onnx_model=artifact(dsl.Model, chain.onnx["ptq_int8"], file="model.onnx", precision="int8"),
        engine=engine,
        runtime="onnxruntime",
        batch_min=1,
        batch_opt=4,
        batch_max=16,
    )
    loaded = load_engine(Path(engine.path) / engine.metadata["file"])
    assert loaded.runtime == "onnxruntime"
    assert loaded.metadata.batch_profile == (1, 4, 16)
    assert engine.metadata["batch_profile"] == [1, 4, 16]
    assert engine.metadata["precision"] == "int8"


def test_unavailable_runtime_leaves_no_engine(chain: Chain, tmp_path: Path) -> None:
    with contextlib.suppress(RuntimeBackendError):
        import_tensorrt()
        pytest.skip("TensorRT is installed here")
    engine = artifact(dsl.Model, tmp_path / "engine")
    with pytest.raises(QatflowError, match="(?i)tensorrt"):
        build_engine.python_func(
            onnx_model=artifact(dsl.Model, chain.onnx["fp32"], file="model.onnx"),
            engine=engine,
            runtime="tensorrt",
        )
    assert list(Path(engine.path).iterdir()) == []
