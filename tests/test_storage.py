"""qatflow.storage against a real moto S3 server over HTTP on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import boto3
import pytest
from tests.s3_server import (
    create_user_without_permissions,
    iam_enforced,
    make_bucket,
    s3_endpoint,
)

from qatflow.errors import StorageError
from qatflow.storage import (
    MIB,
    endpoint_url,
    fetch,
    is_s3_uri,
    parse_s3_uri,
    upload,
)

__all__ = ["s3_endpoint"]  # the imported fixture, named here so linters see it used


def _client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def test_parse_s3_uri() -> None:
    assert is_s3_uri("s3://bucket/a/b.npz")
    assert not is_s3_uri("/data/s3://x")
    assert parse_s3_uri("s3://my-bucket/a/b.npz") == ("my-bucket", "a/b.npz")
    assert parse_s3_uri("s3://my-bucket") == ("my-bucket", "")
    for bad in ("s3:/bucket/key", "s3://", "s3://Bad_Bucket/key", "/local/file"):
        with pytest.raises(StorageError, match="malformed S3 URI"):
            parse_s3_uri(bad)


def test_endpoint_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    assert endpoint_url() is None
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://mlflow:9000")
    assert endpoint_url() == "http://mlflow:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://global:9000")
    assert endpoint_url() == "http://global:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:9000")
    assert endpoint_url() == "http://s3only:9000"


def test_fetch_local_path(tmp_path: Path) -> None:
    file = tmp_path / "x.txt"
    file.write_text("x")
    assert fetch(file) == file
    with pytest.raises(StorageError, match=r"path not found: .*missing\.npz"):
        fetch(tmp_path / "missing.npz")


def test_file_round_trip_and_cache(s3_endpoint: str, tmp_path: Path) -> None:
    bucket = make_bucket(s3_endpoint)
    src = tmp_path / "model.keras"
    src.write_bytes(b"weights" * 1000)
    uri = upload(src, f"s3://{bucket}/models/")
    assert uri == f"s3://{bucket}/models/model.keras"

    got = fetch(uri, tmp_path / "cache")
    assert got.name == "model.keras"
    assert got.read_bytes() == src.read_bytes()
    assert fetch(uri, tmp_path / "cache") == got  # unchanged ETag: cached copy

    src.write_bytes(b"changed")
    upload(src, uri)
    refreshed = fetch(uri, tmp_path / "cache")
    assert refreshed != got
    assert refreshed.read_bytes() == b"changed"
    # Only complete downloads are left in the cache (no temporary entries).
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_folder_round_trip(s3_endpoint: str, tmp_path: Path) -> None:
    bucket = make_bucket(s3_endpoint)
    folder = tmp_path / "saved_model"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"pb")
    (folder / "variables" / "variables.index").write_bytes(b"index")
    assert upload(folder, f"s3://{bucket}/exports/sm") == f"s3://{bucket}/exports/sm"

    for uri in (f"s3://{bucket}/exports/sm", f"s3://{bucket}/exports/sm/"):
        got = fetch(uri, tmp_path / "cache")
        assert got.name == "sm"
        assert (got / "saved_model.pb").read_bytes() == b"pb"
        assert (got / "variables" / "variables.index").read_bytes() == b"index"


def test_multipart_upload_is_used(s3_endpoint: str, tmp_path: Path) -> None:
    bucket = make_bucket(s3_endpoint)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * MIB))
    uri = upload(
        big, f"s3://{bucket}/big.bin", multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB
    )
    head = _client(s3_endpoint).head_object(Bucket=bucket, Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 1 MiB parts
    assert fetch(uri, tmp_path / "cache").read_bytes() == big.read_bytes()


def test_missing_key_and_bucket(s3_endpoint: str, tmp_path: Path) -> None:
    bucket = make_bucket(s3_endpoint)
    with pytest.raises(StorageError, match=rf"key 'nope/data.npz' not found in bucket '{bucket}'"):
        fetch(f"s3://{bucket}/nope/data.npz", tmp_path)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        fetch("s3://no-such-bucket-here/data.npz", tmp_path)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        upload(Path(__file__), "s3://no-such-bucket-here/x.py")
    assert not list(tmp_path.iterdir())


def test_missing_credentials(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = make_bucket(s3_endpoint)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") as err:
        fetch(f"s3://{bucket}/data.npz", tmp_path)
    assert f"s3://{bucket}/data.npz" in str(err.value)


def test_access_denied(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = make_bucket(s3_endpoint)
    src = tmp_path / "data.npz"
    src.write_bytes(b"data")
    upload(src, f"s3://{bucket}/private/data.npz")
    key_id, secret = create_user_without_permissions(s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with iam_enforced(s3_endpoint):
        with pytest.raises(StorageError, match="access denied") as err:
            fetch(f"s3://{bucket}/private/data.npz", tmp_path / "cache")
        message = str(err.value)
        assert f"bucket '{bucket}'" in message and "key 'private/data.npz'" in message
        assert key_id not in message and secret not in message
        with pytest.raises(StorageError, match=rf"access denied to bucket '{bucket}'"):
            upload(src, f"s3://{bucket}/private/other.npz")
    assert not (tmp_path / "cache").exists()


def test_rejected_credentials(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = make_bucket(s3_endpoint)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with iam_enforced(s3_endpoint), pytest.raises(StorageError, match="rejected the credentials"):
        fetch(f"s3://{bucket}/data.npz", tmp_path)
