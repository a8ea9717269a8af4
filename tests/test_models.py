"""qatflow.models: round trips of tiny models, keras.applications names, S3, and errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from tests.s3_server import make_bucket, s3_endpoint

from qatflow.errors import ModelError
from qatflow.models import APPLICATIONS, load_model
from qatflow.quantization.graph import check_layerwise
from qatflow.storage import upload

__all__ = ["s3_endpoint"]  # the imported fixture, named here so linters see it used

X = np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)


def _tiny() -> keras.Model:
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x), name="tiny")


@keras.saving.register_keras_serializable(package="qatflow_tests")
class Subclassed(keras.Model):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(2, 3)
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(3)

    def call(self, inputs: Any) -> Any:
        return self.head(self.pool(self.conv(inputs)))


def _same_outputs(a: keras.Model, b: keras.Model) -> None:
    np.testing.assert_allclose(np.asarray(a(X)), np.asarray(b(X)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_file_round_trip(tmp_path: Path, suffix: str) -> None:
    model = _tiny()
    model.save(tmp_path / f"m{suffix}")
    loaded = load_model(str(tmp_path / f"m{suffix}"), input_shape=(8, 8, 1), num_classes=3)
    _same_outputs(model, loaded)
    with pytest.raises(ModelError, match=r"takes inputs of shape \(8, 8, 1\), not input_shape"):
        load_model(str(tmp_path / f"m{suffix}"), input_shape=(32, 32, 3))
    with pytest.raises(ModelError, match="outputs 3 classes, not num_classes=10"):
        load_model(str(tmp_path / f"m{suffix}"), num_classes=10)


def test_subclassed_model_loads(tmp_path: Path) -> None:
    model = Subclassed()
    model(X)
    model.save(tmp_path / "sub.keras")
    loaded = load_model(str(tmp_path / "sub.keras"))
    assert isinstance(loaded, Subclassed)
    _same_outputs(model, loaded)


def test_application_names_and_weights(tmp_path: Path) -> None:
    assert APPLICATIONS["resnet50"] == "ResNet50"
    assert APPLICATIONS["mobilenetv2"] == "MobileNetV2"
    assert APPLICATIONS["efficientnetb0"] == "EfficientNetB0"
    trained = load_model("MobileNetV2", input_shape=(32, 32, 3), num_classes=4)
    assert trained.output_shape == (None, 4)
    trained.save_weights(tmp_path / "mnv2.weights.h5")
    loaded = load_model(
        "mobilenet_v2",
        weights=str(tmp_path / "mnv2.weights.h5"),
        input_shape=(32, 32, 3),
        num_classes=4,
    )
    for a, b in zip(trained.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ModelError, match=r"cannot load weights .*mnv2\.weights\.h5 into model"):
        load_model("mobilenet_v2", weights=str(tmp_path / "mnv2.weights.h5"), num_classes=7)
    with pytest.raises(ModelError, match=r"weights file not found: .*nope\.weights\.h5"):
        load_model("mobilenet_v2", weights=str(tmp_path / "nope.weights.h5"))
    with pytest.raises(ModelError, match=r"cannot build keras\.applications\.MobileNetV2"):
        load_model("mobilenet_v2", input_shape=(8, 8))


def test_saved_model_is_wrapped(tmp_path: Path) -> None:
    model = _tiny()
    model.export(tmp_path / "exported", verbose=False)
    loaded = load_model(str(tmp_path / "exported"), num_classes=3)
    assert loaded.input_shape == (None, 8, 8, 1)
    _same_outputs(model, loaded)
    with pytest.raises(ModelError, match=r"wraps the SavedModel .*exported in one TFSMLayer"):
        check_layerwise(loaded)
    check_layerwise(model)


def test_s3_models(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QATFLOW_CACHE_DIR", str(tmp_path / "cache"))
    bucket = make_bucket(s3_endpoint)
    model = _tiny()
    model.save(tmp_path / "m.keras")
    model.export(tmp_path / "sm", verbose=False)
    upload(tmp_path / "m.keras", f"s3://{bucket}/models/m.keras")
    upload(tmp_path / "sm", f"s3://{bucket}/models/sm")
    _same_outputs(model, load_model(f"s3://{bucket}/models/m.keras"))
    _same_outputs(model, load_model(f"s3://{bucket}/models/sm/"))
    assert (tmp_path / "cache" / "models").is_dir()


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model file not found: .*missing\.keras"):
        load_model(str(tmp_path / "missing.keras"))
    with pytest.raises(ModelError, match=r"model file not found: .*/resnet50"):
        load_model(str(tmp_path / "resnet50"))  # a path, even if named like an application
    (tmp_path / "bad.keras").write_bytes(b"garbage")
    with pytest.raises(ModelError, match=r"bad\.keras is not a valid Keras \(\.keras\) file"):
        load_model(str(tmp_path / "bad.keras"))
    (tmp_path / "bad.h5").write_bytes(b"garbage")
    with pytest.raises(ModelError, match=r"bad\.h5 is not a valid Keras/H5 file"):
        load_model(str(tmp_path / "bad.h5"))
    _tiny().save_weights(tmp_path / "w.weights.h5")
    (tmp_path / "w.weights.h5").rename(tmp_path / "w.h5")
    with pytest.raises(ModelError, match=r"w\.h5 holds weights only"):
        load_model(str(tmp_path / "w.h5"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelError, match=r"folder .* is not a SavedModel"):
        load_model(str(tmp_path / "folder"))
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"unsupported model file .*model\.onnx"):
        load_model(str(tmp_path / "model.onnx"))
    with pytest.raises(ModelError, match=r"unknown model 'resnet9000'.*resnet50, mobilenet_v2"):
        load_model("resnet9000")
