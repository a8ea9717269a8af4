# syntax=docker/dockerfile:1
# qatflow with TensorRT: INT8 engine build and GPU evaluation (engine-build / engine-evaluate tasks).
# Base: NVIDIA's TensorRT container. 25.10-py3 ships TensorRT 10.13.3, CUDA 13.0 and Python 3.12
# on Ubuntu 24.04 and needs an NVIDIA driver >= 580. For older drivers build with
# --build-arg TRT_TAG=25.01-py3 (TensorRT 10.8, CUDA 12.8, driver >= 570).
# Build from the repository root:
#   docker build -f images/tensorrt.Dockerfile -t qatflow-trt .
ARG TRT_TAG=25.10-py3
FROM nvcr.io/nvidia/tensorrt:${TRT_TAG}

LABEL org.opencontainers.image.title="qatflow-trt" \
      org.opencontainers.image.description="qatflow engine build and evaluation on TensorRT" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    QATFLOW_NO_PROGRESS=1 \
    PYTHONPATH=/opt/qatflow \
    CUDA_ROOT=/usr/local/cuda

# pycuda is built from source against the container's CUDA: it needs the Python headers.
# Versions come from the pinned base image's Ubuntu release, so apt packages are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/qatflow
COPY pyproject.toml setup.py README.md ./
COPY src/ src/
COPY components/ components/
COPY pipelines/ pipelines/

# The container's own TensorRT Python package satisfies the `tensorrt` extra, so pip keeps it.
# Ubuntu 24.04 marks the system Python as externally managed (PEP 668); this image is the only
# consumer of that Python, hence --break-system-packages. Nothing is pip-installed at run time.
RUN pip install --no-cache-dir --break-system-packages "./[tensorrt]" \
    && python3 -c "import tensorrt, pycuda; print('TensorRT', tensorrt.__version__)" \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin qatflow

USER 10001
WORKDIR /home/qatflow
