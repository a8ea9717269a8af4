"""Container images for the KFP components: the one place image names are defined.

Each image comes from a Dockerfile in ``images/``. Override a reference at compile time with its
environment variable, e.g. ``QATFLOW_TF_IMAGE=registry.local/qatflow-tf:dev qatflow compile``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from qatflow.errors import PipelineError

REGISTRY = "ghcr.io/qatflow"
VERSION = "0.1.0"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ImageSpec:
    """One image: its default reference, override variable, Dockerfile and build args."""

    default: str
    env_var: str
    dockerfile: str  # relative to the repository root
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
            build_args={"VARIANT": "cpu"},
        ),
        "tensorflow-gpu": ImageSpec(
            default=f"{REGISTRY}/qatflow-tf:{VERSION}-gpu",
            env_var="QATFLOW_TF_GPU_IMAGE",
            dockerfile="images/tensorflow.Dockerfile",
            build_args={"VARIANT": "gpu"},
        ),
        "tensorrt": ImageSpec(
            default=f"{REGISTRY}/qatflow-trt:{VERSION}",
            env_var="QATFLOW_TRT_IMAGE",
            dockerfile="images/tensorrt.Dockerfile",
        ),
    }
)

# Resolved when the module is imported, i.e. when components are defined and compiled.
TENSORFLOW_IMAGE = IMAGES["tensorflow"].reference
TENSORFLOW_GPU_IMAGE = IMAGES["tensorflow-gpu"].reference
TENSORRT_IMAGE = IMAGES["tensorrt"].reference


def dockerfile_for(image: str) -> Path:
    """The Dockerfile that builds ``image`` (a reference as resolved now).

    Raises:
        PipelineError: if ``image`` is not one of the images defined in ``images/``.
    """
    for spec in IMAGES.values():
        if image == spec.reference:
            return REPO_ROOT / spec.dockerfile
    known = ", ".join(spec.reference for spec in IMAGES.values())
    raise PipelineError(f"image {image!r} is not built from images/; known images: {known}")
