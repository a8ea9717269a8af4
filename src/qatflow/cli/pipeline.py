"""``qatflow run`` and ``qatflow compile``: the pipeline, locally or compiled for a cluster."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the pipeline subcommands (filled in with the KFP pipeline)."""
