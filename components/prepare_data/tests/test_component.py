"""prepare_data: the spec of a real dataset; a bad URI leaves no output."""

import json
from pathlib import Path

import pytest
from kfp import dsl
from qatflow_components.prepare_data.component import prepare_data
from tests.chain import artifact, write_npz

from qatflow.errors import DataError


def test_fashion_mnist_spec(tmp_path: Path) -> None:
    dataset = artifact(dsl.Dataset, tmp_path / "dataset")
    prepare_data.python_func(dataset_uri="fashion-mnist", dataset=dataset, limit=200)
    spec = json.loads(Path(dataset.path).read_text())
    assert spec["uri"] == "fashion-mnist" and spec["limit"] == 200
    assert dataset.metadata["num_classes"] == 10
    assert dataset.metadata["input_shape"] == [28, 28, 1]
    assert dataset.metadata["sizes"]["test"] == 200


def test_npz_without_limit(tmp_path: Path) -> None:
    dataset = artifact(dsl.Dataset, tmp_path / "dataset")
    prepare_data.python_func(
        dataset_uri=str(write_npz(tmp_path / "d.npz", num_classes=3)),
        dataset=dataset,
        preprocessing="tf",
        batch_size=8,
    )
    assert dataset.metadata["sizes"]["test"] == 18
    assert json.loads(Path(dataset.path).read_text())["limit"] is None
    assert dataset.metadata["preprocessing"] == "tf"


def test_bad_uri_leaves_nothing(tmp_path: Path) -> None:
    dataset = artifact(dsl.Dataset, tmp_path / "dataset")
    with pytest.raises(DataError, match="nothing-here"):
        prepare_data.python_func(dataset_uri=str(tmp_path / "nothing-here"), dataset=dataset)
    assert not Path(dataset.path).exists()
    assert list(tmp_path.iterdir()) == []


def test_image_size_resizes(tmp_path: Path) -> None:
    dataset = artifact(dsl.Dataset, tmp_path / "dataset")
    prepare_data.python_func(
        dataset_uri=str(write_npz(tmp_path / "d.npz", num_classes=3)),
        dataset=dataset,
        image_size="8,12",
    )
    assert json.loads(Path(dataset.path).read_text())["image_size"] == [8, 12]
    assert dataset.metadata["input_shape"] == [8, 12, 1]


def test_bad_image_size_leaves_nothing(tmp_path: Path) -> None:
    dataset = artifact(dsl.Dataset, tmp_path / "dataset")
    with pytest.raises(DataError, match="image_size '8x8' must be H,W"):
        prepare_data.python_func(
            dataset_uri=str(write_npz(tmp_path / "d.npz")), dataset=dataset, image_size="8x8"
        )
    assert not Path(dataset.path).exists()
