"""qatflow.data on tiny synthetic npz / IDX / image-folder / TFRecord datasets and Fashion-MNIST."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from tests.s3_server import make_bucket, s3_endpoint

from qatflow.data import (
    PREPROCESSING,
    DatasetBundle,
    DatasetInfo,
    check_model_compatible,
    load_dataset,
    load_dataset_from_spec,
    write_dataset_spec,
)
from qatflow.data.sources import fashion_mnist
from qatflow.errors import DataError
from qatflow.storage import upload

__all__ = ["s3_endpoint"]  # the imported fixture, named here so linters see it used

N_TRAIN, N_TEST, SIDE = 100, 20, 6


def _all(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    batches = list(ds.as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _ids(data: tf.data.Dataset | np.ndarray) -> set[int]:
    """Example ids of an indexed npz (every pixel of example i holds i), after scale01."""
    images = data if isinstance(data, np.ndarray) else _all(data)[0]
    return {round(float(v) * 255) for v in images[:, 0, 0, 0]}


def _indexed_npz(path: Path, **overrides: np.ndarray) -> Path:
    """An npz whose train image i is filled with i and test image j with 200 + j."""
    arrays = {
        "x_train": np.repeat(np.arange(N_TRAIN, dtype=np.uint8), SIDE * SIDE).reshape(
            N_TRAIN, SIDE, SIDE
        ),
        "y_train": np.arange(N_TRAIN) % 4,
        "x_test": np.repeat(np.arange(200, 200 + N_TEST, dtype=np.uint8), SIDE * SIDE).reshape(
            N_TEST, SIDE, SIDE
        ),
        "y_test": np.arange(N_TEST) % 4,
    }
    arrays.update(overrides)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _png(pixels: np.ndarray) -> bytes:
    data: bytes = tf.io.encode_png(pixels).numpy()
    return data


def _image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            height = 8 + i  # sizes differ: the pipeline must resize
            pixels = rng.integers(0, 256, (height, 10, 3), dtype=np.uint8)
            if i % 2:
                (root / name / f"{i}.png").write_bytes(_png(pixels))
            else:
                jpeg = tf.io.encode_jpeg(pixels).numpy()
                (root / name / f"{i}.JPEG").write_bytes(jpeg)
        del label
    return root


def _write_records(path: Path, labels: list[int], image_key: str, label_key: str) -> Path:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for label in labels:
            pixels = np.full((5, 7, 1), label * 10, dtype=np.uint8)
            features = {
                image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[_png(pixels)])),
                label_key: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }
            example = tf.train.Example(features=tf.train.Features(feature=features))
            writer.write(example.SerializeToString())
    return path


# --- Fashion-MNIST ---------------------------------------------------------------------------


def test_fashion_mnist_builtin_with_limit(tmp_path: Path) -> None:
    bundle = load_dataset("fashion-mnist", limit=64, batch_size=32, calibration_size=16)
    info = bundle.info
    assert info.kind == "fashion-mnist"
    assert info.input_shape == (28, 28, 1)
    assert info.num_classes == 10 and info.class_names[9] == "Ankle boot"
    assert dict(info.sizes) == {"train": 64, "validation": 64, "test": 64, "calibration": 16}
    images, labels = next(iter(bundle.test))
    assert images.shape == (32, 28, 28, 1) and images.dtype == tf.float32
    assert labels.dtype == tf.int32
    assert float(tf.reduce_min(images)) >= 0.0 and float(tf.reduce_max(images)) <= 1.0


def test_idx_folder_and_bad_idx(tmp_path: Path) -> None:
    def idx(name: str, array: np.ndarray) -> None:
        header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())

    rng = np.random.default_rng(0)
    idx("train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 4, 5)))
    idx("train-labels-idx1-ubyte.gz", np.arange(30) % 10)
    idx("t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (10, 4, 5)))
    idx("t10k-labels-idx1-ubyte.gz", np.arange(10))
    bundle = load_dataset(str(tmp_path), validation_split=0.2, calibration_size=5)
    assert bundle.info.input_shape == (4, 5, 1)
    assert dict(bundle.info.sizes) == {"train": 24, "validation": 6, "test": 10, "calibration": 5}

    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz is truncated"):
        load_dataset(str(tmp_path))


def test_fashion_mnist_fallback_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "not-installed")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    try:
        bundle = load_dataset("fashion-mnist", limit=8)
    except DataError as exc:  # no internet: the download fails
        assert "apt-get install dataset-fashion-mnist" in str(exc)
    else:  # internet: keras downloaded it
        assert bundle.info.input_shape == (28, 28, 1)


# --- npz, splits and preprocessing -----------------------------------------------------------


def test_npz_splits_are_deterministic_and_disjoint(tmp_path: Path) -> None:
    path = _indexed_npz(tmp_path / "d.npz")
    kwargs = {"batch_size": 16, "validation_split": 0.2, "calibration_size": 10}
    bundle = load_dataset(str(path), **kwargs)
    assert dict(bundle.info.sizes) == {"train": 80, "validation": 20, "test": 20, "calibration": 10}
    assert bundle.info.num_classes == 4
    train_epoch = _all(bundle.train)[0]
    train, validation = _ids(train_epoch), _ids(bundle.validation)
    calibration, test = _ids(bundle.calibration), _ids(bundle.test)
    assert len(train) == 80 and len(validation) == 20 and not train & validation
    assert calibration <= train and len(calibration) == 10
    assert test == set(range(200, 220))
    # Labels travel with their images.
    images, labels = _all(bundle.validation)
    assert np.array_equal(np.round(images[:, 0, 0, 0] * 255).astype(int) % 4, labels)

    again = load_dataset(str(path), **kwargs)
    assert _ids(again.validation) == validation and _ids(again.calibration) == calibration
    assert np.array_equal(_all(again.train)[0], train_epoch)  # the same shuffled order
    assert not np.array_equal(_all(again.train)[0], train_epoch)  # reshuffled every epoch
    other = load_dataset(str(path), seed=1, **kwargs)
    assert _ids(other.validation) != validation

    limited = load_dataset(str(path), limit=7, **kwargs)
    assert dict(limited.info.sizes) == {"train": 7, "validation": 7, "test": 7, "calibration": 7}
    assert len(_ids(limited.train)) == 7


def test_preprocessing_values(tmp_path: Path) -> None:
    rgb = np.zeros((4, 2, 2, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 255
    path = tmp_path / "rgb.npz"
    np.savez(path, x_train=rgb, y_train=np.zeros(4, int), x_test=rgb, y_test=np.zeros(4, int))

    def first_pixel(name: str) -> np.ndarray:
        bundle = load_dataset(str(path), preprocessing=name, validation_split=0.0)
        assert bundle.info.preprocessing == name
        pixel: np.ndarray = next(iter(bundle.test))[0].numpy()[0, 0, 0]
        return pixel

    np.testing.assert_allclose(first_pixel("scale01"), [10 / 255, 20 / 255, 1.0], rtol=1e-6)
    np.testing.assert_allclose(first_pixel("tf"), [10 / 127.5 - 1, 20 / 127.5 - 1, 1.0], rtol=1e-6)
    np.testing.assert_allclose(
        first_pixel("caffe"), [255 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-5
    )
    np.testing.assert_allclose(
        first_pixel("torch"),
        [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (1 - 0.406) / 0.225],
        rtol=1e-5,
    )
    np.testing.assert_allclose(first_pixel("raw"), [10, 20, 255])
    assert {"scale01", "tf", "caffe", "torch"} <= set(PREPROCESSING)
    with pytest.raises(DataError, match=r"unknown preprocessing 'imagenet'.*scale01.*caffe"):
        load_dataset(str(path), preprocessing="imagenet")


def test_resize_and_channels_are_recorded(tmp_path: Path) -> None:
    path = _indexed_npz(tmp_path / "d.npz")
    with pytest.raises(DataError, match=r"'caffe' needs RGB.*channels=3"):
        load_dataset(str(path), preprocessing="caffe")
    bundle = load_dataset(str(path), preprocessing="caffe", channels=3, image_size=(12, 10))
    assert bundle.info.input_shape == (12, 10, 3)
    assert bundle.info.image_size == (12, 10) and bundle.info.channels == 3
    images, _ = next(iter(bundle.test))
    assert images.shape[1:] == (12, 10, 3)
    with pytest.raises(DataError, match=r"channels \(--channels\) must be 1 or 3, got 2"):
        load_dataset(str(path), channels=2)


def test_npz_errors(tmp_path: Path) -> None:
    good = _indexed_npz(tmp_path / "good.npz")
    arrays = dict(np.load(good))
    np.savez(tmp_path / "keys.npz", x_train=arrays["x_train"], y_train=arrays["y_train"])
    with pytest.raises(DataError, match=r"keys\.npz lacks the arrays x_test, y_test"):
        load_dataset(str(tmp_path / "keys.npz"))

    bad_test = _indexed_npz(tmp_path / "range.npz", y_test=np.full(N_TEST, 7))
    with pytest.raises(DataError, match=r"range\.npz y_test: label 7 is out of range.*4 classes"):
        load_dataset(str(bad_test))
    named = _indexed_npz(
        tmp_path / "named.npz",
        class_names=np.array(["a", "b", "c"]),
        y_train=np.arange(N_TRAIN) % 4,
    )
    with pytest.raises(DataError, match=r"y_train: label 3 is out of range; class_names gives 3"):
        load_dataset(str(named))
    negative = _indexed_npz(tmp_path / "neg.npz", y_train=np.arange(N_TRAIN) - 1)
    with pytest.raises(DataError, match="label -1 is out of range"):
        load_dataset(str(negative))
    floats = _indexed_npz(tmp_path / "float.npz", y_train=np.zeros(N_TRAIN, np.float32))
    with pytest.raises(DataError, match="labels must be integers"):
        load_dataset(str(floats))

    nan_test = np.full((N_TEST, SIDE, SIDE), np.nan, np.float32)
    with pytest.raises(DataError, match=r"first batch of the test split holds \d+ non-finite"):
        load_dataset(str(_indexed_npz(tmp_path / "nan.npz", x_test=nan_test)))

    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk\.npz is not a valid \.npz file"):
        load_dataset(str(tmp_path / "junk.npz"))


def test_missing_and_empty_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"dataset not found: .*nowhere\.npz"):
        load_dataset(str(tmp_path / "nowhere.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"dataset folder .*empty is empty"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    (tmp_path / "no_images" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="holds no recognised dataset"):
        load_dataset(str(tmp_path / "no_images"))


# --- image folders and TFRecords (streamed) --------------------------------------------------


def test_image_folder_streams_from_disk(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs")
    bundle = load_dataset(str(root), batch_size=4, validation_split=0.25, test_split=0.2)
    info = bundle.info
    assert info.kind == "image-folder" and info.class_names == ("cat", "dog", "fox")
    assert info.input_shape == (8, 10, 3)  # resized to the first image
    assert sum(info.sizes[s] for s in ("train", "validation", "test")) == 18
    assert info.sizes["test"] == 4 and info.sizes["validation"] == 4
    images, labels = _all(bundle.train)
    assert images.shape == (10, 8, 10, 3) and set(labels) <= {0, 1, 2}

    sized = load_dataset(str(root), image_size=(16, 16), channels=1, limit=3)
    assert sized.info.input_shape == (16, 16, 1)
    assert next(iter(sized.test))[0].shape == (3, 16, 16, 1)

    for path in root.rglob("*.*"):  # streaming: the files are read at iteration time
        path.unlink()
    with pytest.raises(tf.errors.NotFoundError):
        _all(bundle.test)


def test_image_folder_train_val_layout(tmp_path: Path) -> None:
    _image_folder(tmp_path / "train", n=4)
    _image_folder(tmp_path / "val", classes=("cat", "fox"), n=2)
    bundle = load_dataset(str(tmp_path), validation_split=0.0, image_size=(8, 8))
    assert dict(bundle.info.sizes)["test"] == 4 and bundle.info.sizes["train"] == 12
    _, labels = _all(bundle.test)
    assert sorted(labels.tolist()) == [0, 0, 2, 2]  # class ids follow the train folder
    _image_folder(tmp_path / "val2" / "val", classes=("wolf",), n=1)
    _image_folder(tmp_path / "val2" / "train", classes=("cat",), n=1)
    with pytest.raises(DataError, match=r"class folders missing from .*train: wolf"):
        load_dataset(str(tmp_path / "val2"))


def test_tfrecords_file_glob_folder(tmp_path: Path) -> None:
    folder = tmp_path / "records"
    folder.mkdir()
    _write_records(
        folder / "part-0.tfrecord", [0, 1, 2, 3] * 3, "image/encoded", "image/class/label"
    )
    _write_records(folder / "part-1.tfrecord", [4, 0, 1] * 3, "image/encoded", "image/class/label")
    whole = load_dataset(str(folder), validation_split=0.2, test_split=0.2, batch_size=5)
    assert whole.info.kind == "tfrecord" and whole.info.num_classes == 5
    assert whole.info.input_shape == (5, 7, 1)
    sizes = whole.info.sizes
    assert sizes["test"] == 4 and sizes["validation"] == 3 and sizes["train"] == 14
    train_labels = _all(whole.train)[1]
    seen = np.concatenate([train_labels, _all(whole.validation)[1], _all(whole.test)[1]])
    assert sorted(seen.tolist()) == sorted([0, 1, 2, 3] * 3 + [4, 0, 1] * 3)
    images, labels = _all(whole.test)
    np.testing.assert_allclose(images[:, 0, 0, 0], labels * 10 / 255, rtol=1e-6)
    again = load_dataset(str(folder), validation_split=0.2, test_split=0.2, batch_size=5)
    assert np.array_equal(_all(again.test)[1], labels)
    assert np.array_equal(_all(again.train)[1], train_labels)

    globbed = load_dataset(str(folder / "part-*.tfrecord"), limit=3)
    assert globbed.info.sizes["train"] == 3
    single = load_dataset(str(folder / "part-1.tfrecord"), channels=3)
    assert single.info.input_shape == (5, 7, 3) and single.info.num_classes == 5


def test_tfrecords_imagenet_naming_and_short_keys(tmp_path: Path) -> None:
    _write_records(tmp_path / "train-00000-of-00001", [0, 1, 2] * 4, "image", "label")
    _write_records(tmp_path / "validation-00000-of-00001", [2, 1], "image", "label")
    bundle = load_dataset(str(tmp_path), validation_split=0.25)
    assert dict(bundle.info.sizes) == {"train": 9, "validation": 3, "test": 2, "calibration": 9}
    assert sorted(_all(bundle.test)[1].tolist()) == [1, 2]


def test_tfrecord_errors(tmp_path: Path) -> None:
    _write_records(tmp_path / "wrong.tfrecord", [0, 1], "img", "class")
    with pytest.raises(DataError, match=r"wrong\.tfrecord: records need .*found class, img"):
        load_dataset(str(tmp_path / "wrong.tfrecord"))
    (tmp_path / "corrupt.tfrecord").write_bytes(b"\x00" * 40)
    with pytest.raises(DataError, match=r"corrupt\.tfrecord is not a valid TFRecord"):
        load_dataset(str(tmp_path / "corrupt.tfrecord"))


# --- S3, specs, model compatibility ----------------------------------------------------------


def test_s3_npz_and_folder_are_cached(s3_endpoint: str, tmp_path: Path) -> None:
    bucket = make_bucket(s3_endpoint)
    upload(_indexed_npz(tmp_path / "d.npz"), f"s3://{bucket}/data/d.npz")
    upload(_image_folder(tmp_path / "imgs", n=2), f"s3://{bucket}/imgs")
    cache = tmp_path / "cache"
    remote = load_dataset(f"s3://{bucket}/data/d.npz", cache_dir=cache)
    assert remote.info.uri == f"s3://{bucket}/data/d.npz"
    assert _ids(remote.test) == set(range(200, 220))
    load_dataset(f"s3://{bucket}/data/d.npz", cache_dir=cache)
    assert len(list(cache.iterdir())) == 1  # downloaded once
    folder = load_dataset(f"s3://{bucket}/imgs/", cache_dir=cache, test_split=0.5)
    assert folder.info.class_names == ("cat", "dog", "fox")


def test_spec_round_trip(tmp_path: Path) -> None:
    path = _indexed_npz(tmp_path / "d.npz")
    bundle = load_dataset(str(path), batch_size=8, calibration_size=6, image_size=(7, 7))
    spec = write_dataset_spec(bundle, tmp_path / "spec" / "dataset.json")
    data = json.loads(spec.read_text())
    assert DatasetInfo.from_dict(data) == bundle.info
    rebuilt = load_dataset_from_spec(spec)
    assert isinstance(rebuilt, DatasetBundle) and rebuilt.info == bundle.info
    assert np.array_equal(_all(rebuilt.calibration)[0], _all(bundle.calibration)[0])

    args_spec = write_dataset_spec({"uri": str(path), "limit": 5}, tmp_path / "args.json")
    assert load_dataset_from_spec(args_spec).info.sizes["train"] == 5

    arrays = dict(np.load(path))
    _indexed_npz(path, x_train=arrays["x_train"][:50], y_train=arrays["y_train"][:50])
    with pytest.raises(DataError, match=r"no longer matches spec .*dataset\.json: sizes"):
        load_dataset_from_spec(spec)
    with pytest.raises(DataError, match="unknown keys bogus"):
        write_dataset_spec({"uri": str(path), "bogus": 1}, tmp_path / "bad.json")
    with pytest.raises(DataError, match=r"dataset spec not found: .*missing\.json"):
        load_dataset_from_spec(tmp_path / "missing.json")


def test_check_model_compatible(tmp_path: Path) -> None:
    info = load_dataset(str(_indexed_npz(tmp_path / "d.npz")), limit=4).info
    inputs = keras.Input((SIDE, SIDE, 1))
    model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Flatten()(inputs)), name="ok")
    check_model_compatible(info, model)
    wrong_shape = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten()], name="m28")
    with pytest.raises(DataError, match=r"\(6, 6, 1\) \(H, W, C\) but model m28 expects .*28, 28"):
        check_model_compatible(info, wrong_shape)
    inputs = keras.Input((None, None, 1))
    ten = keras.Model(inputs, keras.layers.Dense(10)(inputs), name="ten")
    with pytest.raises(DataError, match="has 4 classes but model ten outputs 10"):
        check_model_compatible(info, ten)


def test_train_split_in_fixed_order_when_asked():
    bundle = load_dataset("fashion-mnist", limit=300, batch_size=50, shuffle_train=False)
    first = np.concatenate([labels for _, labels in bundle.train])
    second = np.concatenate([labels for _, labels in bundle.train])
    np.testing.assert_array_equal(first, second)
    shuffled = load_dataset("fashion-mnist", limit=300, batch_size=50)
    passes = [np.concatenate([labels for _, labels in shuffled.train]) for _ in range(2)]
    assert not np.array_equal(*passes)
