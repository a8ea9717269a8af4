"""finetune: schedules, learning, exact resume, early stopping, errors, progress, mirroring."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from qatflow.errors import DataError, ModelError, flagged
from qatflow.quantization import quantize_model
from qatflow.training import TrainingError, WarmupSchedule, build_demo_model, finetune
from qatflow.training.checkpoint import CHECKPOINT_NAME, checkpoint_path
from qatflow.training.config import CLI_FLAGS

SHAPE = (8, 8, 1)


def make_data(n: int = 96, seed: int = 0, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is the brightest third of the image: learnable by a tiny CNN."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int32)
    images = rng.normal(0.0, 1.0, (n, *SHAPE)).astype(np.float32)
    for index, label in enumerate(labels):
        images[index, :, label * 2 : label * 2 + 3, :] += 1.0
    return images, labels


def batches(images: np.ndarray, labels: np.ndarray, batch: int = 16) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)


def tiny_model(seed: int = 1, classes: int = 3, dropout: bool = True) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    if dropout:
        x = keras.layers.Dropout(0.3)(x)
    return keras.Model(inputs, keras.layers.Dense(classes)(x))


def weights(model: keras.Model) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.variables]


def assert_same_weights(a: keras.Model, b: keras.Model, atol: float = 1e-6) -> None:
    for x, y in zip(weights(a), weights(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


def assert_same_history(a: dict[str, list[float]], b: dict[str, list[float]]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5), key


@pytest.fixture(scope="module")
def data() -> tuple[tf.data.Dataset, tf.data.Dataset]:
    train = make_data(96, seed=0)
    val = make_data(48, seed=1)
    return batches(*train), batches(*val)


ARGS = {"epochs": 4, "learning_rate": 0.05, "warmup_epochs": 1.0, "shuffle_buffer": 64}
ONE_EPOCH = {**ARGS, "epochs": 1, "warmup_epochs": 0.5}


def test_warmup_ends_after_the_real_steps_of_one_epoch() -> None:
    rate = WarmupSchedule(0.1, total_steps=50, warmup_steps=10, kind="cosine")
    values = [float(rate(step)) for step in range(50)]
    assert values[0] == pytest.approx(0.01)
    assert values[9] == pytest.approx(0.1)
    assert values[10] == pytest.approx(0.1)
    assert values[30] == pytest.approx(0.05)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))
    piecewise = WarmupSchedule(0.1, total_steps=50, warmup_steps=10, kind="piecewise")
    assert [float(piecewise(s)) for s in (10, 29, 30, 40, 49)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.001, 0.001]
    )
    assert float(WarmupSchedule(0.1, 50, 0, "constant")(49)) == pytest.approx(0.1)


def test_finetune_learns_and_schedules_per_real_step(data: tuple) -> None:
    train, val = data
    model = tiny_model()
    result = finetune(model, train, val, schedule="constant", **ARGS)
    # 96 examples in batches of 16 = 6 real steps; warm-up (1 epoch) is over after step 6.
    assert result.history["learning_rate"] == pytest.approx([0.05] * 4)
    assert result.history["val_accuracy"][-1] >= 0.9
    assert result.model is model
    assert result.num_replicas == 1
    assert 1 <= result.best_epoch <= 4


def test_steps_per_epoch_walks_through_the_data(data: tuple) -> None:
    train, val = data
    result = finetune(
        tiny_model(),
        train,
        val,
        steps_per_epoch=2,
        batch_size=8,
        optimizer="adam",
        **{**ARGS, "learning_rate": 0.01},
    )
    assert len(result.history["loss"]) == 4
    assert result.history["learning_rate"][0] == pytest.approx(0.01)


@keras.saving.register_keras_serializable(package="test_training")
class Subclassed(keras.Model):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 3, padding="same", activation="relu")
        self.flat = keras.layers.Flatten()
        self.head = keras.layers.Dense(3, activation="softmax")

    def call(self, inputs: Any) -> Any:
        return self.head(self.flat(self.conv(inputs)))


def test_compiled_softmax_and_subclassed_models_train(data: tuple) -> None:
    train, val = data
    keras.utils.set_random_seed(3)
    compiled = keras.Sequential(
        [keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")]
    )
    compiled.compile(optimizer="rmsprop", loss="mse")
    unbuilt = Subclassed()
    for model in (compiled, unbuilt):
        result = finetune(model, train, val, **ARGS)
        assert result.history["val_accuracy"][-1] >= 0.9, model.name
        # Probabilities were detected: the loss is a proper cross-entropy, not of softmax(softmax).
        assert result.history["loss"][-1] < 0.5


class Interrupt(Exception):
    pass


def interrupt_at(epoch: int) -> Callable[[int, dict], None]:
    def callback(done: int, metrics: dict) -> None:
        if done == epoch:
            raise Interrupt

    return callback


def test_interrupted_run_resumes_to_the_same_weights(data: tuple, tmp_path: Path) -> None:
    train, val = data
    reference = finetune(tiny_model(), train, val, optimizer="adam", **ARGS)
    with pytest.raises(Interrupt):
        finetune(
            tiny_model(),
            train,
            val,
            optimizer="adam",
            checkpoint_dir=tmp_path,
            epoch_callback=interrupt_at(2),
            **ARGS,
        )
    # Only the same starting model resumes the checkpoint: other starting weights are refused.
    with pytest.raises(TrainingError, match="the starting model"):
        finetune(tiny_model(seed=9), train, val, optimizer="adam", checkpoint_dir=tmp_path, **ARGS)
    resumed = finetune(tiny_model(), train, val, optimizer="adam", checkpoint_dir=tmp_path, **ARGS)
    assert resumed.resumed_from_epoch == 2
    assert_same_history(resumed.history, reference.history)
    assert_same_weights(resumed.model, reference.model)
    # A finished run resumes to itself without training.
    again = finetune(tiny_model(), train, val, optimizer="adam", checkpoint_dir=tmp_path, **ARGS)
    assert again.resumed_from_epoch == 4
    assert_same_weights(again.model, reference.model)


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_training import ARGS, batches, make_data, tiny_model
from qatflow.training import finetune

def kill(done, metrics):
    if done == 2:
        os.kill(os.getpid(), signal.SIGKILL)

finetune(tiny_model(), batches(*make_data(96, 0)), batches(*make_data(48, 1)),
         checkpoint_dir={ckpt!r}, epoch_callback=kill, **ARGS)
"""


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_killed_process_resumes_to_the_same_weights(data: tuple, tmp_path: Path) -> None:
    train, val = data
    code = KILLED_RUN.format(tests=str(Path(__file__).parent), ckpt=str(tmp_path))
    killed = run_python(code)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert checkpoint_path(tmp_path).exists()
    (tmp_path / f".{CHECKPOINT_NAME}.leftover.npz").write_bytes(b"half")  # a write cut short
    resumed = finetune(tiny_model(), train, val, checkpoint_dir=tmp_path, **ARGS)
    reference = finetune(tiny_model(), train, val, **ARGS)
    assert resumed.resumed_from_epoch == 2
    assert_same_weights(resumed.model, reference.model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


def saved_epochs(directory: Path) -> int:
    with np.load(checkpoint_path(directory)) as saved:
        return int(json.loads(str(saved["meta"]))["state"]["epochs_done"])


def test_interrupted_checkpoint_write_keeps_the_previous_one(
    data: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train, val = data
    real_savez = np.savez
    calls = []

    def savez_cut_short_the_second_time(handle: Any, **arrays: np.ndarray) -> None:
        calls.append(1)
        if len(calls) == 2:
            real_savez(handle, **dict(list(arrays.items())[:3]))
            raise KeyboardInterrupt
        real_savez(handle, **arrays)

    monkeypatch.setattr(np, "savez", savez_cut_short_the_second_time)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_model(), train, val, checkpoint_dir=tmp_path, **ARGS)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]
    assert saved_epochs(tmp_path) == 1
    resumed = finetune(tiny_model(), train, val, checkpoint_dir=tmp_path, **ARGS)
    assert resumed.resumed_from_epoch == 1
    assert_same_weights(resumed.model, finetune(tiny_model(), train, val, **ARGS).model)


def test_resume_refuses_a_checkpoint_of_other_settings(data: tuple, tmp_path: Path) -> None:
    train, val = data
    finetune(tiny_model(), train, val, checkpoint_dir=tmp_path, **ONE_EPOCH)
    with pytest.raises(TrainingError, match=r"learning_rate=0.05 \(now 0.1\)") as info:
        finetune(
            tiny_model(), train, val, checkpoint_dir=tmp_path, **{**ARGS, "learning_rate": 0.1}
        )
    assert str(checkpoint_path(tmp_path)) in str(info.value)
    with pytest.raises(TrainingError, match="the starting model") as info:
        finetune(tiny_model(dropout=False), train, val, checkpoint_dir=tmp_path, **ONE_EPOCH)
    assert "--no-resume" in str(info.value) and "--checkpoint-dir" in str(info.value)
    with pytest.raises(TrainingError, match="the training data differs"):
        finetune(
            tiny_model(), train, val, checkpoint_dir=tmp_path, data_digest="other", **ONE_EPOCH
        )
    started_over = finetune(
        tiny_model(dropout=False), train, val, checkpoint_dir=tmp_path, resume=False, **ONE_EPOCH
    )
    assert started_over.resumed_from_epoch == 0


def test_early_stopping_restores_the_best_weights(tmp_path: Path) -> None:
    train = batches(*make_data(96, seed=0))
    noise_images, _ = make_data(48, seed=1)
    noise_labels = np.random.default_rng(7).integers(0, 3, 48).astype(np.int32)
    val = batches(noise_images, noise_labels)
    result = finetune(
        tiny_model(),
        train,
        val,
        early_stopping_patience=1,
        checkpoint_dir=tmp_path,
        **{**ARGS, "epochs": 12, "learning_rate": 0.3},
    )
    history = result.history["val_accuracy"]
    assert result.stopped_early and len(history) < 12
    assert result.best_val_accuracy == max(history) == history[result.best_epoch - 1]
    correct = sum(
        int(np.sum(np.argmax(result.model(x, training=False), -1) == y.numpy())) for x, y in val
    )
    assert correct / 48 == pytest.approx(result.best_val_accuracy)
    again = finetune(
        tiny_model(),
        train,
        val,
        early_stopping_patience=1,
        checkpoint_dir=tmp_path,
        **{**ARGS, "epochs": 12, "learning_rate": 0.3},
    )
    assert again.history == result.history and again.stopped_early
    assert_same_weights(again.model, result.model)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"epochs": 0}, "epochs"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"momentum": 1.5}, "momentum"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"schedule": "linear"}, "schedule"),
        ({"warmup_epochs": 4}, "warmup_epochs"),
        ({"early_stopping_patience": 0}, "early_stopping_patience"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_bad_hyperparameters_are_named(data: tuple, changes: dict, named: str) -> None:
    train, val = data
    label = flagged(named) if named in CLI_FLAGS else named  # a flag of `qatflow finetune`
    with pytest.raises(TrainingError, match=rf"\b{re.escape(label)} must be"):
        finetune(tiny_model(), train, val, **{**ARGS, **changes})


def test_data_that_does_not_fit_the_model_fails_before_training(data: tuple) -> None:
    train, val = data
    model = tiny_model()
    before = weights(model)
    images, labels = make_data(32)
    wide = batches(np.pad(images, ((0, 0), (0, 2), (0, 0), (0, 0))), labels)
    with pytest.raises(DataError, match=r"train_ds yields images of shape \(10, 8, 1\)"):
        finetune(model, wide, val, **ARGS)
    with pytest.raises(DataError, match=r"val_ds has label 4 .* 3 classes"):
        finetune(model, train, batches(images, labels + 2), **ARGS)
    with pytest.raises(DataError, match="integer class indices"):
        finetune(model, batches(images, labels.astype(np.float32)), val, **ARGS)
    with pytest.raises(ModelError, match=r"keras\.Model"):
        finetune("model.keras", train, val, **ARGS)  # type: ignore[arg-type]
    for a, b in zip(before, weights(model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_at_the_step_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    images, labels = make_data(96)
    images[40] = np.nan  # batch 6 of 8 examples: the 1st step of epoch 2 (2 steps of 16 per epoch)
    train, val = batches(images, labels, 8), batches(*make_data(48, seed=1))
    args = {**ARGS, "shuffle_buffer": 0, "steps_per_epoch": 2, "batch_size": 16}
    with pytest.raises(
        TrainingError, match=r"at train step 1 of epoch 2 \(optimizer step 3\)"
    ) as info:
        finetune(tiny_model(), train, val, checkpoint_dir=tmp_path, **args)
    assert "last good checkpoint" in str(info.value)
    assert saved_epochs(tmp_path) == 1


def test_progress_bar_follows_qatflow_no_progress(
    data: tuple, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    train, val = data
    monkeypatch.setenv("QATFLOW_NO_PROGRESS", "1")
    finetune(tiny_model(), train, val, **ONE_EPOCH)
    assert "epoch 1/1" not in capsys.readouterr().err
    monkeypatch.setenv("QATFLOW_NO_PROGRESS", "0")
    finetune(tiny_model(), train, val, **ONE_EPOCH)
    assert "epoch 1/1" in capsys.readouterr().err


def test_quantized_model_finetunes_and_saves(data: tuple, tmp_path: Path) -> None:
    train, val = data
    model = quantize_model(build_demo_model(SHAPE, 3, widths=(4, 8)))
    result = finetune(model, train, val, **{**ARGS, "epochs": 2})
    assert all(np.isfinite(result.history["loss"]))
    path = tmp_path / "qat.keras"
    result.model.save(path)
    loaded = keras.saving.load_model(path)
    x = next(iter(val))[0]
    np.testing.assert_allclose(loaded(x), result.model(x), atol=1e-5)


MIRRORED_RUN = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, {tests!r})
import numpy as np
from test_training import ARGS, batches, make_data, tiny_model, weights
from qatflow.quantization import quantize_model
from qatflow.training import build_demo_model, finetune

train, val = batches(*make_data(96, 0)), batches(*make_data(48, 1))
plain = finetune(tiny_model(dropout=False), train, val, **ARGS)
np.savez({out!r}, *weights(plain.model))
quantized = finetune(quantize_model(build_demo_model((8, 8, 1), 3, widths=(4, 8))), train, val,
                     **{{**ARGS, "epochs": 2}})
print(json.dumps({{"replicas": [plain.num_replicas, quantized.num_replicas],
                  "history": plain.history, "qat_loss": quantized.history["loss"]}}))
"""


def test_mirrored_strategy_on_two_cpu_devices_matches_one_device(
    data: tuple, tmp_path: Path
) -> None:
    train, val = data
    out = tmp_path / "mirrored.npz"
    done = run_python(MIRRORED_RUN.format(tests=str(Path(__file__).parent), out=str(out)))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["replicas"] == [2, 2]
    assert all(np.isfinite(report["qat_loss"]))
    single = finetune(tiny_model(dropout=False), train, val, **ARGS)
    assert report["history"]["val_accuracy"][-1] == pytest.approx(
        single.history["val_accuracy"][-1], abs=0.1
    )
    with np.load(out) as mirrored:
        for index, value in enumerate(weights(single.model)):
            # Per-replica BatchNorm statistics (8 instead of 16 examples) make it approximate.
            np.testing.assert_allclose(mirrored[f"arr_{index}"], value, atol=0.1, rtol=0.1)
