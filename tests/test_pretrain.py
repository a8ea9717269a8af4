"""The demo model and the cached pretrain (small synthetic data; Fashion-MNIST when slow)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import keras
import numpy as np
import pytest

from qatflow.data import DatasetBundle, load_dataset
from qatflow.errors import DataError
from qatflow.training import build_demo_model, cache_key, pretrain
from qatflow.training.pretrain import Recipe


def test_demo_model_has_identity_and_projection_shortcuts() -> None:
    model = build_demo_model((28, 28, 1), 10)
    adds = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
    assert [layer.name for layer in adds] == ["block1_add", "block2_add", "block3_add"]
    shortcut_sources = [
        layer._inbound_nodes[0].input_tensors[1]._keras_history[0].name for layer in adds
    ]
    assert shortcut_sources == ["stem_relu", "block2_proj_bn", "block3_proj_bn"]
    assert model.output_shape == (None, 10)
    probabilities = model(np.zeros((2, 28, 28, 1), np.float32))
    np.testing.assert_allclose(np.sum(probabilities, axis=1), 1.0, rtol=1e-5)


def write_npz(path: Path, seed: int = 0) -> Path:
    """A 3-class 28x28 dataset: the class is which third of the image is bright."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 3, n).astype(np.uint8)
        images = rng.integers(0, 100, (n, 28, 28)).astype(np.uint8)
        for index, label in enumerate(labels):
            images[index, :, label * 9 : label * 9 + 10] += 150
        return images, labels

    (x_train, y_train), (x_test, y_test) = split(160), split(48)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> DatasetBundle:
    path = write_npz(tmp_path_factory.mktemp("data") / "thirds.npz")
    return load_dataset(str(path), batch_size=32, calibration_size=16)


def test_pretrain_trains_once_then_copies_the_cached_model(
    bundle: DatasetBundle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    first = pretrain(bundle, tmp_path / "a" / "model.keras", epochs=2, cache_dir=cache)
    (cached,) = cache.glob("demo-*.keras")
    assert {p.name for p in cache.iterdir()} == {cached.name, cached.with_suffix(".json").name}
    summary = json.loads(cached.with_suffix(".json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["recipe"]["epochs"] == 2
    model = keras.saving.load_model(first)
    assert model.name == "demo_resnet"
    with caplog.at_level(logging.INFO, logger="qatflow.training"):
        again = pretrain(bundle, tmp_path / "b.keras", epochs=2, cache_dir=cache)
    assert "cache hit" in caplog.text and "fine-tuning" not in caplog.text
    assert again.read_bytes() == cached.read_bytes() == first.read_bytes()
    as_tuple = (bundle.train, bundle.validation, bundle.test, bundle.info)
    with caplog.at_level(logging.INFO, logger="qatflow.training"):
        pretrain(as_tuple, tmp_path / "c.keras", epochs=2, cache_dir=cache)
    assert caplog.text.count("cache hit") == 2


def test_cache_key_covers_dataset_preprocessing_recipe_and_seed(
    bundle: DatasetBundle, tmp_path: Path
) -> None:
    info = bundle.info
    rescaled = load_dataset(info.uri, preprocessing="tf", batch_size=32, calibration_size=16)
    rebatched = load_dataset(info.uri, batch_size=8, calibration_size=16)
    keys = {
        cache_key(info, Recipe(), 0),
        cache_key(info, Recipe(), 1),
        cache_key(info, Recipe(epochs=3), 0),
        cache_key(rescaled.info, Recipe(), 0),
    }
    assert len(keys) == 4
    # The recipe re-batches, so the loader's batch size does not change the model.
    assert cache_key(rebatched.info, Recipe(), 0) == cache_key(info, Recipe(), 0)


def test_pretrain_rejects_what_is_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="DatasetBundle or"):
        pretrain("fashion-mnist", tmp_path / "m.keras")  # type: ignore[arg-type]
    assert not (tmp_path / "m.keras").exists()


@pytest.mark.slow
def test_pretrain_reaches_91_percent_on_fashion_mnist(tmp_path: Path) -> None:
    """The real baseline, cached in the default cache for the pipeline (minutes on 2 cores)."""
    data = load_dataset("fashion-mnist")
    path = pretrain(data, tmp_path / "fp32.keras")
    model = keras.saving.load_model(path)
    correct = total = 0
    for images, labels in data.test:
        predicted = np.argmax(model(images, training=False), axis=-1)
        correct += int(np.sum(predicted == labels.numpy()))
        total += len(predicted)
    assert total == 10_000
    assert correct / total >= 0.91
