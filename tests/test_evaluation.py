"""evaluate(): metrics on hand-made predictions, Keras and ONNX Runtime models, JSON, errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf
import tf2onnx
from tests.results import fidelity_report

from qatflow.data import DatasetBundle, load_dataset
from qatflow.errors import DataError, ModelError, PipelineError, StorageError
from qatflow.evaluation import ClassificationMetrics, EvaluationResult, evaluate
from qatflow.evaluation.metrics import agreement, confusion_matrix, top_k_indices
from qatflow.runtimes import build_engine, load_engine
from qatflow.runtimes.cpu_int8 import detect
from qatflow.runtimes.onnxruntime_backend import write_ort_metadata

SHAPE = (8, 8, 1)
CLASSES = 7
FAST: dict[str, Any] = {"latency_iterations": 6, "warmup": 2, "throughput_batch": 8}


def _tiny_model(classes: int = CLASSES, shape: tuple[int, ...] = SHAPE) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes)(x)
    return keras.Model(inputs, outputs, name="tiny")


def _export(model: keras.Model, path: Path, batch: int | None = None) -> Path:
    spec = tf.TensorSpec((batch, *SHAPE), tf.float32, name="input")
    tf2onnx.convert.from_keras(model, input_signature=[spec], opset=17, output_path=str(path))
    return path


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return _tiny_model()


@pytest.fixture(scope="module")
def engine_path(model: keras.Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("onnx")
    onnx_path = _export(model, folder / "tiny.onnx")
    return build_engine(onnx_path, folder / "tiny.ort.onnx", "onnxruntime", threads=1)


@pytest.fixture(scope="module")
def fashion() -> DatasetBundle:
    """40 real Fashion-MNIST test images (28x28x1, 10 named classes) in batches of 16."""
    return load_dataset("fashion-mnist", limit=40, batch_size=16)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    images = rng.random((50, *SHAPE), dtype=np.float32)
    labels = rng.integers(0, CLASSES, size=50).astype(np.int32)
    return images, labels


def _dataset(images: np.ndarray, labels: np.ndarray, batch: int = 16) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch)


# --- metrics on hand-constructed predictions -------------------------------------------------


def test_top_k_indices_best_first_and_ties_go_to_lower_index() -> None:
    logits = np.array([[0.1, 0.9, 0.5, 0.9], [3.0, 1.0, 2.0, 0.0]])
    assert top_k_indices(logits, 3).tolist() == [[1, 3, 2], [0, 2, 1]]
    assert top_k_indices(logits, 9).shape == (2, 4)


def test_confusion_per_class_top5_and_agreement_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2, 5])
    # rows: best-first class ids, 6 classes so top-5 applies
    top_k = np.array(
        [
            [0, 1, 2, 3, 4],  # label 0: top-1 hit
            [1, 0, 2, 3, 4],  # label 0: top-5 hit only
            [1, 2, 3, 4, 5],  # label 1: hit
            [2, 3, 4, 5, 0],  # label 1: miss everywhere
            [1, 0, 2, 3, 4],  # label 1: hit
            [0, 1, 3, 4, 5],  # label 2: miss everywhere
            [5, 0, 1, 2, 3],  # label 5: hit
        ]
    )
    metrics = ClassificationMetrics.from_top_k(top_k, labels, num_classes=6)
    assert metrics.num_samples == 7
    assert metrics.top1 == pytest.approx(4 / 7)
    assert metrics.top5 == pytest.approx(5 / 7)
    assert metrics.confusion_matrix[0] == [1, 1, 0, 0, 0, 0]
    assert metrics.confusion_matrix[1] == [0, 2, 1, 0, 0, 0]
    assert metrics.confusion_matrix[2] == [1, 0, 0, 0, 0, 0]
    assert metrics.per_class_accuracy == [0.5, pytest.approx(2 / 3), 0.0, None, None, 1.0]
    assert np.array_equal(
        confusion_matrix(labels, top_k[:, 0], 6), np.array(metrics.confusion_matrix)
    )
    assert agreement(top_k[:, 0], np.array([0, 1, 1, 1, 1, 0, 0]), name="ref") == pytest.approx(
        5 / 7
    )


def test_top5_is_none_with_five_classes_or_fewer() -> None:
    metrics = ClassificationMetrics.from_top_k(
        np.array([[1, 0, 2, 3, 4]]), np.array([0]), num_classes=5
    )
    assert metrics.top5 is None
    assert metrics.top1 == 0.0


def test_agreement_rejects_wrong_length_naming_parameter() -> None:
    with pytest.raises(DataError, match=r"reference_predictions.*3 top-1"):
        agreement(np.array([1, 2, 3]), np.array([1, 2]), name="reference_predictions")


# --- evaluate on real models -----------------------------------------------------------------


def test_keras_model_metrics_latency_and_predictions(
    model: keras.Model, data: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = data
    result = evaluate(model, _dataset(images, labels), **FAST)
    expected = np.argmax(model.predict(images, verbose=0), axis=1)
    assert np.array_equal(result.predictions, expected)
    assert result.top1 == pytest.approx(float(np.mean(expected == labels)))
    assert result.top5 is not None and result.top1 <= result.top5 <= 1.0
    assert result.num_samples == 50
    assert result.class_names == [str(i) for i in range(CLASSES)]
    assert sum(map(sum, result.metrics.confusion_matrix)) == 50
    assert result.runtime == "tensorflow"
    assert result.runtime_version.startswith(tf.__version__)
    assert result.device.startswith("cpu")
    assert result.threads is not None and result.threads >= 1
    assert result.latency.batch_size == 1
    assert len(result.latency.samples_ms) == 6 and result.latency.warmup == 2
    assert 0 < result.latency.p50_ms <= result.latency.p90_ms <= result.latency.p99_ms
    assert result.throughput.batch_size == 8
    assert result.throughput.iterations == 1  # latency_iterations // 10, at least 1
    assert result.throughput.images_per_second > 0
    assert result.size_bytes is None and result.agreement is None
    assert result.fidelity is None and result.engine is None  # no engine, no build-time check


def test_keras_model_file_size_is_reported(
    model: keras.Model, data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    path = tmp_path / "tiny.keras"
    model.save(path)
    result = evaluate(model, _dataset(*data), model_file=path, max_batches=1, **FAST)
    assert result.size_bytes == path.stat().st_size
    assert result.size_mb == pytest.approx(path.stat().st_size / 1e6)
    assert result.source == str(path)


def test_onnx_runtime_engine_agrees_with_keras_reference(
    model: keras.Model, engine_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    dataset = _dataset(*data)
    reference = evaluate(model, dataset, **FAST)
    result = evaluate(
        load_engine(engine_path, threads=1),
        dataset,
        reference_predictions=reference.predictions,
        throughput_iterations=3,
        **FAST,
    )
    assert result.agreement == 1.0
    assert result.top1 == pytest.approx(reference.top1)
    assert result.runtime == "onnxruntime" and result.runtime_version == ort.__version__
    assert result.threads == 1 and result.device.startswith("cpu (")
    assert result.size_bytes == engine_path.stat().st_size
    assert result.source == str(engine_path)
    assert result.throughput.iterations == 3 and result.throughput.warmup == 1
    # The engine's build-time fidelity check and kernel record travel into the result.
    metadata = load_engine(engine_path).metadata
    assert metadata.fidelity and result.fidelity == metadata.fidelity
    assert result.fidelity["passed"] is True and result.fidelity["agreement"] == 1.0
    # A float model: no integer encoding, and no node or time in integer kernels.
    assert result.engine == {
        "isa": metadata.device["isa"],
        "integer_nodes": "0.0%",
        "integer_time": "0.0%",
    }


def test_engine_path_is_loaded_with_the_requested_threads(
    engine_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    result = evaluate(str(engine_path), _dataset(*data), threads=2, max_batches=1, **FAST)
    assert result.threads == 2
    assert result.runtime == "onnxruntime"
    assert result.num_samples == 16


def test_engine_with_fixed_batch_is_fed_padded_batches(
    model: keras.Model, data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels = data
    engine = load_engine(_export(model, tmp_path / "fixed.onnx", batch=4), threads=1)
    assert engine.input_shape[0] == 4
    result = evaluate(engine, _dataset(images, labels, batch=16), **FAST)  # 50 = 3*16 + 2
    assert np.array_equal(result.predictions, np.argmax(model.predict(images, verbose=0), axis=1))
    assert result.latency.batch_size == 4
    assert result.throughput.batch_size == 4


def test_dataset_bundle_supplies_class_names_and_max_batches_limits(
    fashion: DatasetBundle,
) -> None:
    model = _tiny_model(10, (28, 28, 1))
    result = evaluate(model, fashion, **FAST)
    assert result.class_names == list(fashion.info.class_names)
    assert result.class_names[9] == "Ankle boot"
    assert result.num_samples == 40
    limited = evaluate(model, fashion, max_batches=2, **FAST)
    assert limited.num_samples == 32
    assert np.array_equal(limited.predictions, result.predictions[:32])


def test_plain_numpy_batches_and_small_dataset_tiles_throughput_batch(
    model: keras.Model, data: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = data
    batches = [(images[:3], labels[:3])]
    result = evaluate(model, batches, latency_iterations=2, warmup=0, throughput_batch=10)
    assert result.num_samples == 3
    assert result.throughput.batch_size == 10
    assert result.throughput.warmup == 0


def _engine_with_metadata(model: keras.Model, folder: Path, **fields: Any) -> Path:
    """The tiny model as an ORT engine whose qatflow metadata carries ``fields``."""
    plain = _export(model, folder / "plain.onnx")
    metadata = dataclasses.replace(
        load_engine(plain).metadata, runtime_version=ort.__version__, **fields
    )
    proto = onnx.load(plain)
    write_ort_metadata(proto, metadata)
    path = folder / "checked.ort.onnx"
    onnx.save(proto, path)
    return path


def test_engine_fidelity_and_kernel_record_reach_the_result(
    model: keras.Model,
    data: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    encoding = detect().best_encoding()  # one this CPU runs exactly, so the engine loads
    failed = {**fidelity_report(0.6125, passed=False), "max_abs_error": math.nan}
    path = _engine_with_metadata(
        model,
        tmp_path,
        build_options={"threads": 1, "encoding": encoding},
        device={"isa": "avx2 (no VNNI)", "flags": ["avx2"], "exact_encodings": ["u8u8"]},
        fidelity=failed,
    )
    with caplog.at_level(logging.WARNING, logger="qatflow.evaluation"):
        result = evaluate(str(path), _dataset(*data), max_batches=1, **FAST)
    assert result.engine == {"encoding": encoding, "isa": "avx2 (no VNNI)"}
    assert result.fidelity is not None
    assert result.fidelity["passed"] is False and result.fidelity["agreement"] == 0.6125
    assert result.fidelity["diverging_tensor"] == "conv1/quant:0"
    assert result.fidelity["max_abs_error"] is None  # NaN is kept out of strict JSON
    assert {k: v for k, v in result.fidelity.items() if k != "max_abs_error"} == {
        k: v for k, v in failed.items() if k != "max_abs_error"
    }
    assert any("failed its build-time fidelity check" in r.getMessage() for r in caplog.records)
    assert "61.25%" in caplog.text

    saved = result.save(tmp_path / "qat_int8.json")
    json.loads(saved.read_text(), parse_constant=lambda c: pytest.fail(f"constant {c}"))
    loaded = EvaluationResult.load(saved)
    assert loaded == result
    assert loaded.fidelity == result.fidelity and loaded.engine == result.engine
    assert loaded.to_dict() == result.to_dict()


def test_engine_without_fidelity_or_kernel_record(
    model: keras.Model, data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    plain = _export(model, tmp_path / "plain.onnx")  # no qatflow metadata at all
    result = evaluate(str(plain), _dataset(*data), max_batches=1, **FAST)
    assert result.runtime == "onnxruntime"
    assert result.fidelity is None and result.engine is None
    assert EvaluationResult.from_dict(result.to_dict()) == result


# --- JSON --------------------------------------------------------------------------------------


def test_json_round_trip_is_lossless_and_strict(
    model: keras.Model, data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    images, labels = data
    labels = np.where(labels == 3, 0, labels)  # class 3 has no samples: per-class None
    result = evaluate(model, _dataset(images, labels), **FAST)
    assert result.metrics.per_class_accuracy[3] is None
    path = result.save(tmp_path / "out" / "fp32.json")
    assert [p.name for p in path.parent.iterdir()] == ["fp32.json"]  # no temp file left
    text = path.read_text()
    assert "NaN" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    loaded = EvaluationResult.load(path)
    assert loaded == result
    assert loaded.to_dict() == result.to_dict()
    assert np.array_equal(loaded.predictions, result.predictions)
    assert loaded.latency.p99_ms == result.latency.p99_ms
    assert loaded.fidelity is None and loaded.engine is None
    assert json.loads(text)["fidelity"] is None and json.loads(text)["engine"] is None


def test_results_written_before_fidelity_existed_still_load(
    model: keras.Model, data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    result = dataclasses.replace(
        evaluate(model, _dataset(*data), max_batches=1, **FAST),
        fidelity=fidelity_report(),
        engine={"encoding": "u8s8", "isa": "avx512_vnni"},
    )
    document = result.to_dict()
    assert document["fidelity"] == fidelity_report()
    assert EvaluationResult.from_dict(document) == result
    old = {k: v for k, v in document.items() if k not in ("fidelity", "engine")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = EvaluationResult.load(tmp_path / "old.json")
    assert loaded.fidelity is None and loaded.engine is None
    assert loaded.top1 == result.top1
    with pytest.raises(DataError, match=r"malformed.*fidelity must be an object"):
        EvaluationResult.from_dict({**document, "fidelity": [0.9]})


def test_load_rejects_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"missing\.json"):
        EvaluationResult.load(tmp_path / "missing.json")
    foreign = tmp_path / "other.json"
    foreign.write_text('{"accuracy": 0.9}')
    with pytest.raises(DataError, match=r"other\.json.*not a qatflow\.evaluation_result"):
        EvaluationResult.load(foreign)
    truncated = tmp_path / "truncated.json"
    truncated.write_text('{"format": "qatflow.evaluation_result", "version": 1}')
    with pytest.raises(DataError, match=r"truncated\.json.*malformed.*source"):
        EvaluationResult.load(truncated)


# --- errors ------------------------------------------------------------------------------------


def _error(model: Any, dataset: Any, **kwargs: Any) -> str:
    with pytest.raises((DataError, ModelError, PipelineError)) as info:
        evaluate(model, dataset, **{**FAST, **kwargs})
    return str(info.value)


def test_image_shape_mismatch_is_reported_before_timing(model: keras.Model) -> None:
    images = np.zeros((4, 9, 9, 1), np.float32)
    message = _error(model, [(images, np.zeros(4, np.int32))])
    assert "batch 0" in message and "(9, 9, 1)" in message and "(8, 8, 1)" in message


def test_class_count_mismatch(
    model: keras.Model, data: tuple[np.ndarray, np.ndarray], fashion: DatasetBundle
) -> None:
    message = _error(model, _dataset(*data), class_names=["a", "b", "c"])
    assert "outputs 7 classes" in message and "3 classes" in message
    seven = _tiny_model(CLASSES, (28, 28, 1))
    assert "outputs 7 classes but the dataset has 10" in _error(seven, fashion)
    assert "class_names has 2 entries" in _error(seven, fashion, class_names=["a", "b"])
    assert "(28, 28, 1) does not match the model input shape (8, 8, 1)" in _error(model, fashion)


def test_nan_inputs_name_the_batch(model: keras.Model, data: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = data
    images = images.copy()
    images[37, 2, 2, 0] = np.nan  # batch 2 (images 32-47), position 5
    message = _error(model, _dataset(images, labels))
    assert "batch 2" in message and "NaN or Inf" in message and "[5]" in message


def test_bad_labels_and_empty_dataset(model: keras.Model) -> None:
    images = np.zeros((2, *SHAPE), np.float32)
    assert "label 7 is outside" in _error(model, [(images, np.array([1, 7]))])
    assert "expected (2,) integer" in _error(model, [(images, np.array([0.0, 1.0]))])
    assert "dataset is empty" in _error(model, [])
    assert "not an (images, labels) pair" in _error(model, [images])


def test_reference_and_parameter_errors(
    model: keras.Model, data: tuple[np.ndarray, np.ndarray]
) -> None:
    dataset = _dataset(*data)
    assert "reference_predictions" in _error(model, dataset, reference_predictions=[0, 1])
    assert "latency_iterations" in _error(model, dataset, latency_iterations=0)
    assert "warmup" in _error(model, dataset, warmup=-1)
    assert "throughput_batch" in _error(model, dataset, throughput_batch=0)
    assert "max_batches" in _error(model, dataset, max_batches=0)
    assert "threads" in _error(model, dataset, threads=0)
    assert "throughput_iterations" in _error(model, dataset, throughput_iterations=0)
    assert "got int" in _error(42, dataset)
