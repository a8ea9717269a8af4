"""Models users bring: a Keras 2 ``.h5`` Sequential, their own preprocessing layers, several
outputs, custom layers (``--custom-objects``) and subclassed models, through the CLI as a
user runs it (in-process: the same ``main`` the console script calls)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import keras
import numpy as np
import onnx
import pytest
from tests.model_zoo import images

import qatflow
from qatflow.cli import main
from qatflow.errors import ModelError
from qatflow.models import load_model, register_custom_objects
from qatflow.onnx.reference import run_reference
from qatflow.quantization.observer import float_activations
from qatflow.runtimes import load_engine

USER_MODULE = "qatflow_user_layers"
USER_CODE = '''
import keras


class Scale(keras.layers.Layer):
    """A per-channel learned scale: a custom layer qatflow does not know."""

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="gamma")

    def call(self, x):
        return x * self.gamma


@keras.saving.register_keras_serializable(package="user")
class Net(keras.Model):
    """A subclassed model: layers, but no functional graph."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 3, activation="relu")
        self.flat = keras.layers.Flatten()
        self.fc = keras.layers.Dense(3)

    def call(self, x):
        return self.fc(self.flat(self.conv(x)))
'''


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
    """Run ``qatflow ARGV``; return the exit status and stderr."""
    capsys.readouterr()
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err


def engine_agrees(engine_path: Path, qmodel: keras.Model, x: np.ndarray) -> None:
    """The engine computes what the quantized Keras model computes."""
    expected = np.asarray(qmodel(x))
    got = load_engine(engine_path).run(x)
    np.testing.assert_allclose(got, expected, atol=0.02 * np.abs(expected).max())


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A user's module of custom objects in the current directory; registrations undone."""
    (tmp_path / f"{USER_MODULE}.py").write_text(USER_CODE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    registered = dict(keras.saving.get_custom_objects())
    yield tmp_path
    keras.saving.get_custom_objects().clear()
    keras.saving.get_custom_objects().update(registered)
    sys.modules.pop(USER_MODULE, None)


def test_keras2_h5_sequential_goes_through_quantize_export_validate_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tf_keras  # Keras 2, which writes .h5 files as third-party models have them

    tf_keras.utils.set_random_seed(0)
    legacy = tf_keras.Sequential(
        [
            tf_keras.layers.Conv2D(8, 3, activation="relu", input_shape=(28, 28, 1)),
            tf_keras.layers.MaxPooling2D(),
            tf_keras.layers.Conv2D(8, 3, activation="relu"),
            tf_keras.layers.Flatten(),
            tf_keras.layers.Dense(10, activation="softmax"),
        ]
    )
    h5 = tmp_path / "third_party.h5"
    legacy.save(h5)
    with h5py.File(h5) as f:
        assert str(f.attrs["keras_version"]).startswith("2.")
    x = images(64, (28, 28, 1))
    np.save(tmp_path / "calibration.npy", x)

    q, onnx_path, engine = tmp_path / "q.keras", tmp_path / "q.onnx", tmp_path / "q.engine.onnx"
    assert (
        cli(capsys, "quantize", h5, "-o", q, "--calibration-data", tmp_path / "calibration.npy")[0]
        == 0
    )
    assert cli(capsys, "export", q, "-o", onnx_path)[0] == 0
    assert cli(capsys, "validate", onnx_path)[0] == 0
    assert cli(capsys, "build-engine", onnx_path, "-o", engine)[0] == 0

    qmodel = load_model(str(q))
    engine_agrees(engine, qmodel, x[:16])
    agreement = (np.asarray(qmodel(x)).argmax(1) == legacy.predict(x, verbose=0).argmax(1)).mean()
    assert agreement >= 0.9


def test_own_rescaling_and_normalization_layers_keep_their_statistics(tmp_path: Path) -> None:
    x = images(32, (28, 28, 1)) * 255.0
    norm = keras.layers.Normalization(name="normalization")
    norm.adapt(x / 255.0)
    inputs = keras.Input((28, 28, 1))
    h = norm(keras.layers.Rescaling(1 / 255.0, name="rescaling")(inputs))
    h = keras.layers.Flatten()(keras.layers.Conv2D(4, 3, activation="relu")(h))
    model = keras.Model(inputs, keras.layers.Dense(10)(h))
    model.save(tmp_path / "fp32.keras")

    qmodel = qatflow.quantize_model(load_model(str(tmp_path / "fp32.keras")))
    reasons = {row.layer: row.why for row in qatflow.summarize(qmodel).rows}
    assert (
        reasons["rescaling"]
        == reasons["normalization"]
        == "left in float: no arithmetic to quantize"
    )
    with float_activations():  # only the weights quantized: close to FP32
        np.testing.assert_allclose(qmodel(x[:4]), model(x[:4]), atol=0.05)
    qatflow.calibrate(qmodel, x, num_batches=2, batch_size=16)
    path = qatflow.export_onnx(qmodel, tmp_path / "q.onnx")
    proto = onnx.load(str(path))
    got = run_reference(proto, {proto.graph.input[0].name: x[:4]})[0]
    np.testing.assert_allclose(got, qmodel(x[:4]), atol=1e-4)
    assert (got.argmax(1) == np.asarray(model(x[:4])).argmax(1)).all()


def test_multi_output_model_quantizes_and_exports_every_head(tmp_path: Path) -> None:
    inputs = keras.Input((16, 16, 3))
    h = keras.layers.Flatten()(keras.layers.Conv2D(4, 3, activation="relu")(inputs))
    heads = [keras.layers.Dense(5, name="classes")(h), keras.layers.Dense(4, name="box")(h)]
    qmodel = qatflow.quantize_model(keras.Model(inputs, heads))
    x = images(8, (16, 16, 3))
    qatflow.calibrate(qmodel, x, num_batches=2, batch_size=4)
    path = qatflow.export_onnx(qmodel, tmp_path / "two_heads.onnx")
    assert qatflow.validate_onnx(path).ok
    proto = onnx.load(str(path))
    assert len(proto.graph.output) == 2
    outputs = run_reference(proto, {proto.graph.input[0].name: x})
    for got, expected in zip(outputs, qmodel(x), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_custom_layer_loads_with_custom_objects_option(
    user_module: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scale = register_custom_objects([f"{USER_MODULE}:Scale"])["Scale"]
    inputs = keras.Input((12, 12, 1))
    h = scale()(keras.layers.Conv2D(4, 3, activation="relu")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
    model.save(user_module / "custom.h5")
    np.save(user_module / "calibration.npy", images(16, (12, 12, 1)))
    # A fresh process: the module not imported, nothing registered.
    sys.modules.pop(USER_MODULE)
    keras.saving.get_custom_objects().pop("Scale")

    quantize = ("quantize", "custom.h5", "-o", "q.keras", "--calibration-data", "calibration.npy")
    status, err = cli(capsys, *quantize)
    assert status == 2 and "custom.h5" in err and "--custom-objects MODULE:ATTR" in err
    assert "Traceback" not in err and not (user_module / "q.keras").exists()

    option = ("--custom-objects", f"{USER_MODULE}:Scale")
    assert cli(capsys, *quantize, *option)[0] == 0
    assert cli(capsys, "export", "q.keras", "-o", "q.onnx", *option)[0] == 0
    assert qatflow.validate_onnx(user_module / "q.onnx").ok


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected MODULE:ATTR"),
        ("no_such_module_here:Scale", "cannot import no_such_module_here"),
        (f"{USER_MODULE}:Missing", f"module {USER_MODULE} has no attribute 'Missing'"),
        (f"{USER_MODULE}:USER_CODE_IS_NOT_HERE", "has no attribute"),
    ],
)
def test_bad_custom_objects_name_the_spec(user_module: Path, spec: str, message: str) -> None:
    with pytest.raises(ModelError, match=f"--custom-objects '{spec}': .*{message}"):
        register_custom_objects([spec])


def test_subclassed_model_gets_one_error_that_says_what_to_do(
    user_module: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    register_custom_objects([f"{USER_MODULE}:Net"])
    net = sys.modules[USER_MODULE].Net()
    x = images(4, (8, 8, 1))
    net(x)
    net.save(user_module / "sub.keras")

    for command in ("quantize", "export"):
        status, err = cli(capsys, command, "sub.keras", "-o", "out.x")
        assert status == 2, err
        assert (
            "subclassed keras.Model (Net)" in err
            and "keras.Model(inputs, model.call(inputs))" in err
        )
        assert "Traceback" not in err and not (user_module / "out.x").exists()

    # The advice works: the traced model has the same layers and weights, and quantizes.
    loaded = load_model("sub.keras")
    inputs = keras.Input((8, 8, 1))
    functional = keras.Model(inputs, loaded.call(inputs))
    np.testing.assert_allclose(functional(x), loaded(x), atol=1e-6)
    rows = qatflow.summarize(qatflow.quantize_model(functional)).rows
    assert [(r.layer_class, r.input_quantized) for r in rows] == [
        ("Conv2D", "yes"),
        ("Flatten", "no"),
        ("Dense", "yes"),
    ]
