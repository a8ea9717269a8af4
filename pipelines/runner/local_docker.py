"""``qatflow run --runner docker``: kfp.local's DockerRunner set up to run qatflow's images here.

Every task runs in the image its component names, built by this checkout (``images/``): the
images must exist locally (they are never pulled). Containers run as the caller's uid:gid with
``HOME=/tmp``, so everything they write on the host belongs to the caller; local inputs are
mounted read-only and the local MLflow store's folder read-write, and that folder is the
working directory, so MLflow's relative artifact root (``./mlruns``) lands on the host.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from qatflow import storage
from qatflow.data.sources.fashion_mnist import SYSTEM_DIR as FASHION_MNIST_DIR
from qatflow.errors import PipelineError
from qatflow.images import CONTEXT_LABEL, IMAGES, checkout_root, context_hash, image_name

log = logging.getLogger("qatflow_pipelines.runner.local_docker")

RUN_LABEL = "org.qatflow.run"  # on every task container: the run's output folder
CONTAINER_HOME = "/tmp"


def check_images(references: Iterable[str]) -> dict[str, str]:
    """The local image ID of each image reference; fails fast when Docker or an image is missing.

    Warns when an image was built from other sources than this checkout's (``CONTEXT_LABEL``);
    without a checkout (qatflow installed from a wheel) there is nothing to compare with.

    Raises:
        PipelineError: Docker is not running, or an image is not built here (naming the
            ``make`` target that builds it).
    """
    import docker
    from docker.errors import DockerException, ImageNotFound

    try:
        client = docker.from_env()
        client.ping()
    except DockerException as err:
        raise PipelineError(
            f"Docker is not running or not reachable ({err}); start the Docker daemon "
            "(dockerd) or use --runner subprocess"
        ) from err
    root = checkout_root()
    if root is None:
        log.info("qatflow is not installed from a checkout: image sources are not checked")
    ids = {}
    try:
        for reference in sorted(set(references)):
            name = image_name(reference)
            target = IMAGES[name].make_target
            try:
                image = client.images.get(reference)
            except ImageNotFound as err:
                raise PipelineError(
                    f"image {reference} is not built here; `make {target}` builds it "
                    "(images of this checkout are never pulled)"
                ) from err
            built_from = (image.labels or {}).get(CONTEXT_LABEL)
            if root is not None and built_from != context_hash(name, root):
                log.warning(
                    "image %s was built from other sources than this checkout; "
                    "`make %s` rebuilds it",
                    reference,
                    target,
                )
            ids[reference] = str(image.id)
    finally:
        client.close()
    return ids


def images_fingerprint(image_ids: Mapping[str, str]) -> str:
    """A short hash of the image IDs, for the step cache key."""
    text = "\0".join(f"{ref}={image_ids[ref]}" for ref in sorted(image_ids))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def local_inputs(*uris: str) -> list[Path]:
    """The existing local files or folders among ``uris`` (empty ones skipped), made absolute."""
    paths = [Path(uri).expanduser() for uri in uris if uri]
    return [path.resolve() for path in paths if path.exists()]


def mlflow_store_dir(tracking_uri: str) -> Path | None:
    """The local folder of a ``sqlite:`` database or a ``file:``/path store; None for a server.

    ``sqlite:///name.db`` is relative to the working directory, ``sqlite:////abs/name.db``
    absolute (SQLAlchemy's convention).
    """
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        return Path(parsed.path[1:]).resolve().parent
    if parsed.scheme in ("", "file"):
        return Path(parsed.path).resolve()
    return None


def docker_runner(*, run_label: str, read_only: Sequence[Path], mlflow_dir: Path | None) -> Any:
    """A ``kfp.local.DockerRunner`` with qatflow's settings (see the module docstring).

    ``read_only`` paths are mounted at the same place; so are Fashion-MNIST's system folder (if
    installed), ``mlflow_dir`` and qatflow's cache folder (``QATFLOW_CACHE_DIR``, so a pretrained
    demo model is reused as in a subprocess run), the last two read-write.
    """
    from docker.types import Mount
    from kfp import local

    cache = storage.cache_dir("pretrain").parent
    cache.mkdir(parents=True, exist_ok=True)
    inputs = [*read_only, *([FASHION_MNIST_DIR] if FASHION_MNIST_DIR.is_dir() else [])]
    writable = [cache, *([mlflow_dir] if mlflow_dir else [])]
    # One mount per path; a path that is both an input and writable is mounted writable.
    mounts = {str(path): True for path in inputs} | {str(path): False for path in writable}
    return local.DockerRunner(
        user=f"{os.getuid()}:{os.getgid()}",
        environment={"HOME": CONTAINER_HOME, "QATFLOW_CACHE_DIR": str(cache)},
        mounts=[Mount(p, p, type="bind", read_only=ro) for p, ro in mounts.items()],
        working_dir=str(mlflow_dir or CONTAINER_HOME),
        labels={RUN_LABEL: run_label},
    )
