# qatflow: every target works as the very first command on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# qemu-user runs the engine tests on an emulated AVX2 CPU without VNNI (tests/test_engine_encoding.py).
QEMU := /usr/bin/qemu-x86_64
# A C compiler builds bench/cpuid_mask.so (CPUID masked to an AVX2 or AVX-512-without-VNNI CPU).
CC_BIN := /usr/bin/cc
TENSORRT_STUBS := tensorrt-stubs==10.13.0.35.1
# Keep TensorFlow on the CPU and quiet in every target.
export TF_CPP_MIN_LOG_LEVEL ?= 2
export CUDA_VISIBLE_DEVICES ?=

.PHONY: setup test test-all lint run run-docker bench mlflow-ui compile clean data \
	images images-tf images-trt base-image

setup: $(STAMP) data $(QEMU) $(CC_BIN)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# The stubs declare a dependency on TensorRT itself, which cannot be installed here.
	$(BIN)/pip install --quiet --no-deps '$(TENSORRT_STUBS)'
	touch $(STAMP)

data: $(FASHION_MNIST)

$(FASHION_MNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

$(QEMU):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq qemu-user

$(CC_BIN):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq gcc libc6-dev

bench/cpuid_mask.so: bench/cpuid_mask.c | $(CC_BIN)
	$(CC_BIN) -O2 -Wall -Wextra -shared -fPIC -o $@ $<

# `make test` is the CI suite; tests marked slow (the 91% demo pretrain, ~8 min on 2 cores)
# run with `make test-all`.
test: setup
	$(BIN)/pytest -m "not slow"

test-all: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check src tests components pipelines bench
	$(BIN)/ruff format --check src tests components pipelines bench
	$(BIN)/mypy
	scripts/mypy-tensorrt

run: setup
	$(BIN)/qatflow run --output runs/local

bench: setup
	$(BIN)/python -m bench

mlflow-ui: setup
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db

compile: setup
	$(BIN)/qatflow compile --output pipeline.yaml

# Images: one target each, tagged with the references the compiled pipeline names
# (qatflow.images), built with BuildKit by scripts/build-image (see images/README.md).
# images-tf takes TensorFlow from PyPI on $(BASE_IMAGE), by default a Debian base made here from
# Debian's archive (`make base-image`: root and debootstrap), so it needs no container registry.
# TF_VARIANT=cpu builds on tensorflow/tensorflow instead, BASE_IMAGE=debian:bookworm-slim on
# Docker Hub's Debian. pip's CA bundle (PIP_CA, default: pip's configured cert) is a secret.
DOCKER ?= $(shell scripts/docker-cli)
export DOCKER
BASE_IMAGE ?= qatflow-base:bookworm
TF_VARIANT ?= pypi
BUILD_IMAGE = $(BIN)/python scripts/build-image
images: images-tf images-trt

images-tf: setup $(if $(filter pypi,$(TF_VARIANT)),$(if $(filter qatflow-base:%,$(BASE_IMAGE)),base-image))
	$(BUILD_IMAGE) tensorflow VARIANT=$(TF_VARIANT) DEBIAN_BASE=$(BASE_IMAGE)

images-trt: setup
	$(BUILD_IMAGE) tensorrt

base-image:
	scripts/base-image $(BASE_IMAGE)

# The pipeline as `make run` runs it, every task in a container of the TensorFlow image.
run-docker: images-tf
	$(BIN)/qatflow run --runner docker --output runs/docker

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
