"""prepare_model: the demo model trained on the dataset, or a model file checked against it."""

from pathlib import Path

import keras
import pytest
from kfp import dsl
from qatflow_components.prepare_model.component import prepare_model
from tests.chain import Chain, artifact

from qatflow.errors import DataError, ModelError


def test_demo_model_is_pretrained(chain: Chain, tmp_path: Path, pretrain_cache: Path) -> None:
    model = artifact(dsl.Model, tmp_path / "model")
    prepare_model.python_func(
        dataset=artifact(dsl.Dataset, chain.dataset),
        model=model,
        model_uri="demo",
        pretrain_epochs=1,
    )
    loaded = keras.models.load_model(Path(model.path) / model.metadata["file"])
    assert loaded.input_shape == (None, 16, 16, 1) and loaded.output_shape == (None, 10)
    assert model.metadata["precision"] == "fp32" and model.schema_title == "system.Model"
    assert list(pretrain_cache.glob("pretrain/demo-*.keras"))  # cached for the next run


def test_model_file_is_copied(chain: Chain, tmp_path: Path) -> None:
    model = artifact(dsl.Model, tmp_path / "model")
    prepare_model.python_func(
        dataset=artifact(dsl.Dataset, chain.dataset),
        model=model,
        model_uri=str(chain.fp32 / "model.keras"),
    )
    assert (Path(model.path) / "model.keras").is_file()
    assert model.metadata["source"] == str(chain.fp32 / "model.keras")


def test_mismatched_model_leaves_no_model(chain: Chain, tmp_path: Path) -> None:
    other = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(4)]
    )
    other.save(tmp_path / "other.keras")
    model = artifact(dsl.Model, tmp_path / "model")
    with pytest.raises((DataError, ModelError), match="other.keras|input|shape"):
        prepare_model.python_func(
            dataset=artifact(dsl.Dataset, chain.dataset),
            model=model,
            model_uri=str(tmp_path / "other.keras"),
        )
    assert not (Path(model.path) / "model.keras").exists()
