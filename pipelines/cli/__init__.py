"""The ``qatflow`` commands that run the pipeline: ``pipeline`` (run, compile) and ``cluster``
(submit, schedule). ``register`` is the ``qatflow.commands`` entry point (pyproject.toml) that
``qatflow.cli.build_parser`` loads; it imports neither kfp nor TensorFlow.
"""

from __future__ import annotations

import argparse

from qatflow_pipelines.cli import cluster, pipeline


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``run``, ``compile``, ``submit`` and ``schedule``, in that order."""
    pipeline.register(subparsers)
    cluster.register(subparsers)
