"""Container images for the KFP components: the one place image names are defined.

Each image comes from a Dockerfile in ``images/``. Override a reference at compile time with its
environment variable, e.g. ``QATFLOW_TF_IMAGE=registry.local/qatflow-tf:dev qatflow compile``.
Building an image needs a qatflow source checkout (``root``: the Dockerfiles and the files they
copy are not in the wheel); ``checkout_root()`` is the one qatflow runs from, if any.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from qatflow import __version__ as VERSION
from qatflow.errors import PipelineError

REGISTRY = "ghcr.io/qatflow"


@dataclass(frozen=True)
class ImageSpec:
    """One image: its default reference, override variable, Dockerfile, Make target, build args."""

    default: str
    env_var: str
    dockerfile: str  # relative to the repository root
    make_target: str  # the Makefile target that builds it
    build_args: Mapping[str, str] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        """The image reference to use now: the env override, else the default."""
        return os.environ.get(self.env_var) or self.default


IMAGES: Mapping[str, ImageSpec] = MappingProxyType(
    {
        "tensorflow": ImageSpec(
            default=f"{REGISTRY}/qatflow-tf:{VERSION}",
            env_var="QATFLOW_TF_IMAGE",
            dockerfile="images/tensorflow.Dockerfile",
            make_target="images-tf",
            build_args={"VARIANT": "cpu"},
        ),
        "tensorrt": ImageSpec(
            default=f"{REGISTRY}/qatflow-trt:{VERSION}",
            env_var="QATFLOW_TRT_IMAGE",
            dockerfile="images/tensorrt.Dockerfile",
            make_target="images-trt",
        ),
    }
)

# Resolved when the module is imported, i.e. when components are defined and compiled.
TENSORFLOW_IMAGE = IMAGES["tensorflow"].reference
TENSORRT_IMAGE = IMAGES["tensorrt"].reference


def image_name(image: str) -> str:
    """The key in ``IMAGES`` of ``image`` (a reference as resolved now).

    Raises:
        PipelineError: if ``image`` is not one of the images defined in ``images/``.
    """
    for name, spec in IMAGES.items():
        if image == spec.reference:
            return name
    known = ", ".join(spec.reference for spec in IMAGES.values())
    raise PipelineError(f"image {image!r} is not built from images/; known images: {known}")


def checkout_root() -> Path | None:
    """The source checkout qatflow runs from (an editable install, or ``src`` on the path).

    None when qatflow is installed from a wheel, which holds no Dockerfiles.
    """
    root = Path(__file__).resolve().parents[2]  # <root>/src/qatflow/images.py
    return root if (root / "pyproject.toml").is_file() and (root / "images").is_dir() else None


CONTEXT_LABEL = "org.qatflow.context-hash"
PIP_CA_SECRET = "pip-ca"  # the BuildKit secret id the Dockerfiles mount for pip's CA bundle
_COPY = re.compile(r"^COPY\s+(?!--from)(?:--\S+\s+)*(.+?)\s+\S+\s*$", re.MULTILINE)


def copied_paths(dockerfile: Path) -> list[str]:
    """The build-context paths that ``dockerfile``'s ``COPY`` instructions copy, in order."""
    return [path for sources in _COPY.findall(dockerfile.read_text()) for path in sources.split()]


def context_hash(name: str, root: Path) -> str:
    """A short hash of image ``name``'s Dockerfile and of every file it copies (paths, contents),
    in the checkout ``root``.

    Files that ``.dockerignore`` excludes anywhere in the tree (its ``**/NAME`` patterns) are
    skipped, as the build skips them. Builds label the image with the hash (``CONTEXT_LABEL``),
    so an image built from other sources under the same tag can be told apart.
    """
    dockerfile = root / IMAGES[name].dockerfile
    ignored = _ignored_everywhere(root)
    digest = hashlib.sha256(dockerfile.read_bytes())
    for source in copied_paths(dockerfile):
        copied = root / source
        for path in sorted(copied.rglob("*")) if copied.is_dir() else [copied]:
            parts = path.relative_to(root).parts
            if path.is_dir() or any(fnmatch.fnmatch(p, g) for p in parts for g in ignored):
                continue
            digest.update(f"\0{'/'.join(parts)}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _ignored_everywhere(root: Path) -> list[str]:
    lines = (root / ".dockerignore").read_text().splitlines()
    return [line.removeprefix("**/") for line in lines if line.startswith("**/")]


def build_command(
    name: str,
    docker: str,
    *,
    root: Path,
    pip_ca: str | None = None,
    build_args: Mapping[str, str] = {},
) -> list[str]:
    """The ``docker build`` command line for image ``name``, from the checkout ``root``.

    Tags the image with its reference and labels it with ``context_hash``. ``build_args`` go
    over the image's own. ``pip_ca`` (a CA bundle file for pip) is passed as the BuildKit secret
    ``PIP_CA_SECRET``, never as a build argument, so it is neither stored in the image nor in
    its history.
    """
    spec = IMAGES[name]
    command = [docker, "build", "-f", str(root / spec.dockerfile), "-t", spec.reference]
    for key, value in {**spec.build_args, **build_args}.items():
        command += ["--build-arg", f"{key}={value}"]
    if pip_ca:
        command += ["--secret", f"id={PIP_CA_SECRET},src={Path(pip_ca).resolve()}"]
    return [*command, "--label", f"{CONTEXT_LABEL}={context_hash(name, root)}", str(root)]
