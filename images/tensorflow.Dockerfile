# syntax=docker/dockerfile:1
# qatflow with TensorFlow: data, training (pretrain + QAT), ONNX export, ONNX Runtime evaluation.
# Build from the repository root (see images/README.md):
#   docker build -f images/tensorflow.Dockerfile --build-arg VARIANT=cpu -t qatflow-tf:cpu .
#   docker build -f images/tensorflow.Dockerfile --build-arg VARIANT=gpu -t qatflow-tf:gpu .
ARG TF_VERSION=2.21.0
ARG VARIANT=cpu

FROM tensorflow/tensorflow:${TF_VERSION} AS base-cpu
FROM tensorflow/tensorflow:${TF_VERSION}-gpu AS base-gpu

# hadolint ignore=DL3006
FROM base-${VARIANT}

LABEL org.opencontainers.image.title="qatflow-tf" \
      org.opencontainers.image.description="qatflow pipeline steps that need TensorFlow" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    QATFLOW_NO_PROGRESS=1 \
    PYTHONPATH=/opt/qatflow

WORKDIR /opt/qatflow
COPY pyproject.toml setup.py README.md ./
COPY src/ src/
COPY components/ components/
COPY pipelines/ pipelines/

# Everything a task needs is installed here; KFP tasks never pip-install at run time.
# The base image's TensorFlow already satisfies the tensorflow pin, so pip keeps it.
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin qatflow

USER 10001
WORKDIR /home/qatflow
