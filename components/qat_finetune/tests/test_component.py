"""qat_finetune: a fine-tuned quantized model, its history, and training metrics."""

import json
from pathlib import Path

import pytest
from kfp import dsl
from qatflow_components.qat_finetune.component import qat_finetune
from tests.chain import Chain, artifact

from qatflow.training import TrainingError


def test_finetune_a_few_steps(chain: Chain, tmp_path: Path) -> None:
    finetuned = artifact(dsl.Model, tmp_path / "finetuned")
    training = artifact(dsl.Metrics, tmp_path / "training")
    qat_finetune.python_func(
        model=artifact(dsl.Model, chain.quantized, file="model.keras"),
        dataset=artifact(dsl.Dataset, chain.dataset),
        finetuned=finetuned,
        training=training,
        epochs=1,
        learning_rate=1e-3,
        steps_per_epoch=2,
    )
    folder = Path(finetuned.path)
    assert (folder / "model.keras").is_file()
    history = json.loads((folder / "model.history.json").read_text())
    assert history["best_epoch"] == 1
    assert training.metadata["best_epoch"] == 1
    assert json.loads(Path(training.path).read_text()) == history
    assert 0.0 <= training.metadata["best_val_accuracy"] <= 1.0
    assert finetuned.metadata["precision"] == "int8"


def test_bad_learning_rate_leaves_no_model(chain: Chain, tmp_path: Path) -> None:
    finetuned = artifact(dsl.Model, tmp_path / "finetuned")
    with pytest.raises(TrainingError, match="learning_rate"):
        qat_finetune.python_func(
            model=artifact(dsl.Model, chain.quantized, file="model.keras"),
            dataset=artifact(dsl.Dataset, chain.dataset),
            finetuned=finetuned,
            training=artifact(dsl.Metrics, tmp_path / "training"),
            learning_rate=-1.0,
        )
    assert list(Path(finetuned.path).iterdir()) == []
