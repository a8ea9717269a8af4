"""Compile the QAT INT8 pipeline to a KFP v2 YAML package, atomically."""

from __future__ import annotations

import os
from pathlib import Path

from qatflow_pipelines.qat_int8.pipeline import GpuOptions, build_pipeline

from qatflow.params import CLUSTER_RUNTIME
from qatflow.storage import atomic_output


def compile_pipeline(
    path: str | os.PathLike[str],
    *,
    runtime: str = CLUSTER_RUNTIME,
    gpu: GpuOptions | None = None,
) -> Path:
    """Compile the pipeline for ``runtime`` to ``path`` (``.yaml``) and return the path.

    ``gpu`` (a ``GpuOptions``) sets the accelerator, toleration and node selector of the engine
    build and evaluate tasks when ``runtime`` is ``tensorrt``. Image references come from
    ``qatflow.images`` (override them with their environment variables before compiling).
    """
    from kfp import compiler

    pipeline = build_pipeline(runtime=runtime, gpu=gpu)
    target = Path(path)
    with atomic_output(target) as tmp:
        compiler.Compiler().compile(pipeline, str(tmp))
    return target
