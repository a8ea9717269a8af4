# qatflow with TensorRT: INT8 engine build and GPU evaluation (engine-build / engine-evaluate tasks).
# Base: NVIDIA's TensorRT container. 25.10-py3 ships TensorRT 10.13.3, CUDA 13.0 and Python 3.12
# on Ubuntu 24.04 and needs an NVIDIA driver >= 580. For older drivers build with
# --build-arg TRT_TAG=25.01-py3 (TensorRT 10.8, CUDA 12.8, driver >= 570).
# TensorRT 11 (strongly typed builds; see docs/runtimes.md), either of:
#   --build-arg TRT_TAG=<an NGC tag whose release notes list TensorRT 11.x> --build-arg TRT_MAJOR=11
#   --build-arg TRT_PYPI_VERSION=11.4.0.106 --build-arg TRT_MAJOR=11   (the tensorrt wheel
#     from PyPI on the CUDA 13 base, installed over the container's TensorRT 10)
# The build fails unless the TensorRT that Python imports has major version TRT_MAJOR.
# Build from the repository root:
#   docker build -f images/tensorrt.Dockerfile -t qatflow-trt .
ARG TRT_TAG=25.10-py3
FROM nvcr.io/nvidia/tensorrt:${TRT_TAG}
ARG TRT_MAJOR=10
ARG TRT_PYPI_VERSION=""

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

# pycuda (>= 2025.1.2: the first to build against CUDA 13) is built from source against the
# container's CUDA: it needs the Python headers.
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

# The container's own TensorRT Python package (or the TRT_PYPI_VERSION wheel) satisfies the
# `tensorrt` extra, so pip keeps it.
# Ubuntu 24.04 marks the system Python as externally managed (PEP 668); this image is the only
# consumer of that Python, hence --break-system-packages. Nothing is pip-installed at run time.
RUN if [ -n "${TRT_PYPI_VERSION}" ]; then \
        pip install --no-cache-dir --break-system-packages "tensorrt==${TRT_PYPI_VERSION}"; fi \
    && pip install --no-cache-dir --break-system-packages "./[tensorrt]" \
    && python3 -c "import sys, tensorrt, pycuda; v = tensorrt.__version__; print('TensorRT', v); \
sys.exit(0 if v.split('.')[0] == '${TRT_MAJOR}' else f'TensorRT {v} is not TRT_MAJOR=${TRT_MAJOR}')" \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin qatflow

USER 10001
WORKDIR /home/qatflow
