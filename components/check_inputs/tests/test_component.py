"""check_inputs: good inputs pass; a bad model, dataset or S3 destination fails by name."""

from pathlib import Path

import pytest
from qatflow_components.check_inputs.component import check_inputs
from tests.s3_server import make_bucket, s3_endpoint

from qatflow.errors import DataError, ModelError, StorageError

__all__ = ["s3_endpoint"]


def test_good_inputs_pass(tmp_path: Path, s3_endpoint: str) -> None:
    model = tmp_path / "model.keras"
    model.write_bytes(b"not read by the check")
    bucket = make_bucket(s3_endpoint)
    check_inputs.python_func(model_uri="demo", dataset_uri="fashion-mnist")
    check_inputs.python_func(
        model_uri=str(model), dataset_uri="fashion-mnist", s3_prefix=f"s3://{bucket}/runs"
    )


def test_unknown_model_fails_by_name() -> None:
    with pytest.raises(ModelError, match="no_such_model"):
        check_inputs.python_func(model_uri="no_such_model", dataset_uri="fashion-mnist")
    with pytest.raises(ModelError, match="missing.keras"):
        check_inputs.python_func(model_uri="/nowhere/missing.keras", dataset_uri="fashion-mnist")


def test_missing_dataset_fails_by_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no-data"):
        check_inputs.python_func(model_uri="demo", dataset_uri=str(tmp_path / "no-data"))


def test_s3_objects_and_buckets_must_exist(s3_endpoint: str) -> None:
    bucket = make_bucket(s3_endpoint)
    with pytest.raises(DataError, match=f"model_uri s3://{bucket}/models/m.keras not found"):
        check_inputs.python_func(
            model_uri=f"s3://{bucket}/models/m.keras", dataset_uri="fashion-mnist"
        )
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-qf' does not exist"):
        check_inputs.python_func(
            model_uri="demo", dataset_uri="fashion-mnist", s3_prefix="s3://no-such-bucket-qf/x"
        )


def test_missing_s3_credentials_fail_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # never reached
    with pytest.raises(StorageError, match="no AWS credentials found to access s3://bucket-x/"):
        check_inputs.python_func(
            model_uri="demo", dataset_uri="fashion-mnist", s3_prefix="s3://bucket-x/runs"
        )


def test_placement_spec_must_exist(tmp_path: Path, s3_endpoint: str) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("layers: []\n")
    check_inputs.python_func(model_uri="demo", dataset_uri="fashion-mnist", spec=str(spec))
    with pytest.raises(StorageError, match="placement spec not found: .*nope.yaml"):
        check_inputs.python_func(
            model_uri="demo", dataset_uri="fashion-mnist", spec=str(tmp_path / "nope.yaml")
        )
    bucket = make_bucket(s3_endpoint)
    with pytest.raises(DataError, match=f"placement spec s3://{bucket}/spec.yaml not found"):
        check_inputs.python_func(
            model_uri="demo", dataset_uri="fashion-mnist", spec=f"s3://{bucket}/spec.yaml"
        )
