# qatflow with TensorFlow: data, training (pretrain + QAT), ONNX export, ONNX Runtime evaluation.
# Build from the repository root with BuildKit (DOCKER_BUILDKIT=1); `make images-tf` does this
# (see images/README.md):
#   docker build -f images/tensorflow.Dockerfile -t qatflow-tf:cpu .        # tensorflow/tensorflow
#   docker build -f images/tensorflow.Dockerfile --build-arg VARIANT=gpu -t qatflow-tf:gpu .
# Without a registry: TensorFlow from PyPI on a Debian base made by `make base-image`, the CA
# bundle pip verifies TLS against passed as a secret (used while building, never stored):
#   docker build -f images/tensorflow.Dockerfile --build-arg VARIANT=pypi \
#     --build-arg DEBIAN_BASE=qatflow-base:bookworm \
#     --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt -t qatflow-tf:cpu .
ARG TF_VERSION=2.21.0
ARG VARIANT=cpu
ARG TF_BASE=tensorflow/tensorflow
ARG DEBIAN_BASE=debian:bookworm-slim

FROM ${TF_BASE}:${TF_VERSION} AS base-cpu
FROM ${TF_BASE}:${TF_VERSION}-gpu AS base-gpu

# Plain Debian (bookworm: Python 3.11) with TensorFlow from PyPI in a virtual environment.
FROM ${DEBIAN_BASE} AS base-pypi
ARG TF_VERSION
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL
# pip verifies TLS against the system bundle, which the pip-ca secret replaces while pip runs.
ENV PATH=/opt/venv/bin:$PATH \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
# Versions come from the Debian release of the base image, so apt packages are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
RUN --mount=type=secret,id=pip-ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=cache,target=/root/.cache/pip \
    python3 -m pip install "tensorflow==${TF_VERSION}"

# hadolint ignore=DL3006
FROM base-${VARIANT}
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL

LABEL org.opencontainers.image.title="qatflow-tf" \
      org.opencontainers.image.description="qatflow pipeline steps that need TensorFlow" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    TF_CPP_MIN_LOG_LEVEL=2 \
    QATFLOW_NO_PROGRESS=1 \
    PYTHONPATH=/opt/qatflow

# Everything a task needs is installed here; KFP tasks never pip-install at run time.
# Dependencies first, from pyproject.toml alone, so that a change to the code reuses this layer.
# TensorFlow is already in every base, and it satisfies the tensorflow pin.
WORKDIR /opt/qatflow
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip-ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=cache,target=/root/.cache/pip \
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && python3 -m pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY setup.py README.md ./
COPY src/ src/
COPY components/ components/
COPY pipelines/ pipelines/
RUN --mount=type=secret,id=pip-ca,target=/etc/ssl/certs/ca-certificates.crt \
    --mount=type=cache,target=/root/.cache/pip \
    python3 -m pip install --no-deps . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin qatflow

USER 10001
WORKDIR /home/qatflow
