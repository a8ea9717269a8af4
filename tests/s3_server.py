"""A real moto S3 server on 127.0.0.1 for tests.

Use it with ``from tests.s3_server import s3_endpoint`` in a test module (list it in the module's
``__all__`` so that ruff does not report the parameter as a redefinition). The fixture is
session-scoped, points boto3 (``AWS_ENDPOINT_URL``) and MLflow (``MLFLOW_S3_ENDPOINT_URL``) at the
server with fake credentials, and restores the environment afterwards. ``make_bucket`` creates a
bucket; ``iam_enforced`` and ``create_user_without_permissions`` simulate an access-denied caller.
"""

from __future__ import annotations

import contextlib
import os
import urllib.request
import uuid
from collections.abc import Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    # No user profile or config file may redirect the tests to a real account.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
CLEARED_ENV = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start moto's S3 server on a free port of 127.0.0.1 and yield its URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        with pytest.MonkeyPatch.context() as env:
            for name, value in FAKE_ENV.items():
                env.setenv(name, value)
            for name in CLEARED_ENV:
                env.delenv(name, raising=False)
            env.setenv("AWS_ENDPOINT_URL", url)
            env.setenv("MLFLOW_S3_ENDPOINT_URL", url)
            yield url
    finally:
        server.stop()


def make_bucket(endpoint: str, name: str | None = None) -> str:
    """Create a bucket (a fresh unique name by default) on the server and return its name."""
    bucket = name or f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


def create_user_without_permissions(endpoint: str) -> tuple[str, str]:
    """Create an IAM user with no policy attached; return its (access key id, secret key)."""
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    user = f"denied-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@contextlib.contextmanager
def iam_enforced(endpoint: str) -> Iterator[None]:
    """Make the server check IAM permissions on every request inside the block.

    moto skips authorization by default; its ``/moto-api/reset-auth`` endpoint sets how many
    requests go unchecked (0 here, unlimited again afterwards).
    """
    _reset_auth(endpoint, "0")
    try:
        yield
    finally:
        _reset_auth(endpoint, "inf")


def _reset_auth(endpoint: str, unchecked_requests: str) -> None:
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=unchecked_requests.encode(),
        headers={"Content-Type": "text/plain"},  # not a form: moto reads the raw body
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
