"""``--param NAME=VALUE``: pipeline parameters given as text, typed by the compiled pipeline.

Shared by ``qatflow run``, ``submit`` and ``schedule``.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from qatflow import cluster


def add_param_option(parser: argparse.ArgumentParser, help: str) -> None:
    """Add the repeatable ``--param NAME=VALUE`` option, collected as ``args.params``."""
    parser.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        type=_param_pair,
        metavar="NAME=VALUE",
        help=help,
    )


def _param_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--param {text!r} must look like NAME=VALUE")
    return name.strip(), value


@contextlib.contextmanager
def compiled_package(path: Path | None) -> Iterator[Path]:
    """The given package, or the qatflow pipeline compiled into a temporary file."""
    if path is not None:
        yield path
        return
    from qatflow_pipelines.runner.compile import compile_pipeline

    with tempfile.TemporaryDirectory(prefix="qatflow-pipeline-") as tmp:
        package = Path(tmp) / "qatflow-pipeline.yaml"
        compile_pipeline(package)
        yield package


def typed_parameters(
    pairs: Sequence[tuple[str, str]], package: Path | None = None
) -> dict[str, object]:
    """``pairs`` converted to the types of ``package`` (default: the qatflow pipeline) and
    checked against its rules."""
    with compiled_package(package) as compiled:
        return cluster.parse_arguments(compiled, dict(pairs))
