"""Local paths and ``s3://`` URIs (boto3, any S3-compatible endpoint), and atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import boto3
from boto3.exceptions import Boto3Error, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)
from tqdm import tqdm

from qatflow.errors import StorageError
from qatflow.progress import progress_enabled

log = logging.getLogger("qatflow.storage")

S3_SCHEME = "s3://"
# Precedence follows the AWS SDKs (service-specific first); MLflow's variable is the last resort.
ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
MIB = 1024 * 1024
DEFAULT_MULTIPART_THRESHOLD = 64 * MIB
DEFAULT_MULTIPART_CHUNKSIZE = 16 * MIB
_CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for MinIO or "
    "another S3-compatible store)"
)
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_BAD_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    A failure leaves no file (or the previous file) at ``path``, so no later step can pick up
    something half-written. A path that cannot be written raises a StorageError naming it.
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{final.name}.", suffix=final.suffix, dir=final.parent
        )
    except OSError as exc:
        raise StorageError(f"cannot write {final}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if not tmp.exists():
            raise StorageError(f"nothing was written to {final}")
        try:
            os.replace(tmp, final)
        except OSError as exc:
            raise StorageError(f"cannot write {final}: {exc.strerror or exc}") from exc
    finally:
        if tmp.exists():
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp)
            else:
                tmp.unlink()


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented, strict JSON (no NaN), atomically; return the path."""
    text = json.dumps(data, indent=2, allow_nan=False, default=str) + "\n"
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_s3_uri(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` is an ``s3://`` URI (as opposed to a local path)."""
    return isinstance(uri, str) and uri.startswith(S3_SCHEME)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; the key may be empty or a prefix."""
    if not is_s3_uri(uri):
        raise StorageError(f"malformed S3 URI {uri!r}: expected s3://bucket/key")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise StorageError(
            f"malformed S3 URI {uri!r}: bucket {bucket!r} is not a valid bucket name "
            "(3-63 lowercase letters, digits, dots or hyphens)"
        )
    return bucket, key


def endpoint_url() -> str | None:
    """The S3 endpoint from the environment (first of ``ENDPOINT_ENV_VARS`` set), else AWS."""
    for name in ENDPOINT_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def s3_client() -> Any:
    """A boto3 S3 client for the configured endpoint (s3v4 signatures, path-style on custom ones).

    A fresh boto3 session is used each time so that credentials are read from the current
    environment rather than cached from an earlier call.
    """
    endpoint = endpoint_url()
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"} if endpoint else {},
        retries={"max_attempts": 3, "mode": "standard"},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def cache_dir(kind: str) -> Path:
    """The download cache for ``kind`` (``datasets``, ``models``...): ``$QATFLOW_CACHE_DIR/kind``.

    ``QATFLOW_CACHE_DIR`` defaults to ``~/.cache/qatflow``.
    """
    root = os.environ.get("QATFLOW_CACHE_DIR") or "~/.cache/qatflow"
    return Path(root).expanduser() / kind


@dataclass(frozen=True)
class _RemoteObject:
    key: str
    etag: str
    size: int


def fetch(uri: str | os.PathLike[str], dest_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a local path for ``uri``.

    A local path is returned as is. An ``s3://`` object or prefix (folder) is downloaded under
    ``dest_dir`` (default ``cache_dir("downloads")``) into a folder keyed by the URI and the
    objects' ETags, so an unchanged object is downloaded once. The download is atomic: the
    returned path is complete or absent.
    """
    if not is_s3_uri(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise StorageError(f"path not found: {path}")
        return path
    uri = str(uri)
    bucket, key = parse_s3_uri(uri)
    client = s3_client()
    with _s3_errors(bucket, key):
        objects, prefix = _list_remote(client, bucket, key)
    digest = hashlib.sha256(uri.encode())
    for obj in objects:
        digest.update(f"\n{obj.key}\t{obj.etag}".encode())
    entry = Path(dest_dir or cache_dir("downloads")).expanduser() / digest.hexdigest()[:24]
    name = PurePosixPath(key.rstrip("/")).name or bucket
    if entry.exists():
        log.info("using cached copy of %s at %s", uri, entry / name)
        return entry / name
    try:
        with atomic_output(entry) as tmp, _progress(sum(o.size for o in objects), uri) as bar:
            for obj in objects:
                rel = obj.key[len(prefix) :] if prefix is not None else ""
                local = tmp / name / rel if rel else tmp / name
                local.parent.mkdir(parents=True, exist_ok=True)
                with _s3_errors(bucket, obj.key):
                    client.download_file(bucket, obj.key, str(local), Callback=bar.update)
    except OSError:
        if not entry.exists():  # a concurrent fetch of the same objects won the rename
            raise
    return entry / name


def check_uploadable(uri: str) -> None:
    """Raise a StorageError, before any work, unless ``uri`` names an object in a bucket that
    exists and credentials are set (access rights show only when the object is written)."""
    bucket, key = parse_s3_uri(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"output {uri} names no object: give s3://bucket/key")
    if boto3.session.Session().get_credentials() is None:
        raise StorageError(f"no AWS credentials found to write {uri}: {_CREDENTIALS_HINT}")
    try:
        with _s3_errors(bucket, key):
            s3_client().head_bucket(Bucket=bucket)
    except StorageError as exc:
        if isinstance(exc.__cause__, ClientError) and _error_code(exc.__cause__) in {
            "404",
            "NoSuchBucket",
        }:
            raise StorageError(f"bucket {bucket!r} does not exist (needed for {uri})") from None
        raise


def upload(
    local_path: str | os.PathLike[str],
    uri: str,
    *,
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
    multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
) -> str:
    """Upload a file or a folder to ``uri`` and return the URI written.

    A file goes to ``uri`` itself, or to ``uri/<file name>`` when ``uri`` ends with ``/``; a
    folder's files go under the prefix ``uri``. Files of ``multipart_threshold`` bytes or more
    are sent as multipart uploads in parts of ``multipart_chunksize`` (S3 needs 5 MiB or more).
    """
    src = Path(local_path)
    if not src.exists():
        raise StorageError(f"cannot upload {src}: path not found")
    bucket, key = parse_s3_uri(uri)
    if src.is_dir():
        base = key.rstrip("/")
        files = sorted(p for p in src.rglob("*") if p.is_file())
        if not files:
            raise StorageError(f"cannot upload {src}: the folder holds no files")
        pairs = [(f, f"{base}/{f.relative_to(src).as_posix()}".lstrip("/")) for f in files]
        target = f"{S3_SCHEME}{bucket}/{base}"
    else:
        if not key or key.endswith("/"):
            key += src.name
        pairs = [(src, key)]
        target = f"{S3_SCHEME}{bucket}/{key}"
    config = TransferConfig(
        multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize
    )
    client = s3_client()
    with _progress(sum(f.stat().st_size for f, _ in pairs), target) as bar:
        for path, object_key in pairs:
            with _s3_errors(bucket, object_key):
                client.upload_file(
                    str(path), bucket, object_key, Config=config, Callback=bar.update
                )
    log.info("uploaded %s to %s", src, target)
    return target


def _list_remote(client: Any, bucket: str, key: str) -> tuple[list[_RemoteObject], str | None]:
    """The objects behind ``key`` and, for a prefix, the prefix they share (``None`` for one)."""
    if key and not key.endswith("/"):
        try:
            head = client.head_object(Bucket=bucket, Key=key)
            return [_RemoteObject(key, head["ETag"], head["ContentLength"])], None
        except ClientError as exc:
            if _error_code(exc) == "403":
                # HEAD responses carry no error body; a one-byte GET says why access failed.
                client.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")["Body"].close()
            if _error_code(exc) not in _MISSING_KEY_CODES:
                raise
        key += "/"
    objects = [
        _RemoteObject(item["Key"], item["ETag"], item["Size"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        for item in page.get("Contents", [])
        if not item["Key"].endswith("/")
    ]
    if not objects:
        raise StorageError(
            f"key {key.rstrip('/')!r} not found in bucket {bucket!r} "
            "(no object and no objects under that prefix)"
        )
    return objects, key


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _s3_errors(bucket: str, key: str) -> Iterator[None]:
    """Turn boto errors into StorageErrors naming the bucket and key (never the credentials)."""
    try:
        yield
    except S3UploadFailedError as exc:  # boto3 wraps the ClientError of a failed upload
        cause = exc.__context__
        raise _storage_error(cause if isinstance(cause, ClientError) else exc, bucket, key) from exc
    except (BotoCoreError, ClientError, Boto3Error) as exc:
        raise _storage_error(exc, bucket, key) from exc


def _storage_error(exc: Exception, bucket: str, key: str) -> StorageError:
    where = f"{S3_SCHEME}{bucket}/{key}"
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StorageError(f"no AWS credentials found to access {where}: {_CREDENTIALS_HINT}")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(
            f"cannot reach the S3 endpoint {endpoint_url() or 'AWS'} for {where}; "
            f"check {' / '.join(ENDPOINT_ENV_VARS)}"
        )
    if not isinstance(exc, ClientError):
        return StorageError(f"S3 request for {where} failed: {type(exc).__name__}")
    code = _error_code(exc)
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    detail = f"HTTP {status}" if code == str(status) else f"HTTP {status} {code}"
    if code in _BAD_CREDENTIAL_CODES:
        return StorageError(
            f"S3 rejected the credentials used for {where} ({code}): {_CREDENTIALS_HINT}"
        )
    if code in _DENIED_CODES or status == 403:
        return StorageError(f"access denied to bucket {bucket!r}, key {key!r} ({detail})")
    if code == "NoSuchBucket":
        return StorageError(f"bucket {bucket!r} does not exist (needed for {where})")
    if code in _MISSING_KEY_CODES:
        return StorageError(f"key {key!r} not found in bucket {bucket!r}")
    return StorageError(f"S3 request for {where} failed ({detail})")


def _progress(total: int, desc: str) -> tqdm[Any]:
    """A byte progress bar on stderr for transfers (a callback-driven sibling of ``progress``)."""
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        file=sys.stderr,
        leave=False,
        disable=not progress_enabled(),
    )
