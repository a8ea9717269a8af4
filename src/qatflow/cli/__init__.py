"""The ``qatflow`` console script: one module per command group, each with ``register``.

Commands are thin: they parse arguments, call one function of ``qatflow.steps`` (or the
cluster helpers), and print where the results went. Errors that qatflow raises on purpose
(``QatflowError``) print as one line without a traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from qatflow import __version__

COMMAND_MODULES = (
    "qatflow.cli.toolkit",
    "qatflow.cli.steps",
    "qatflow.cli.pipeline",
    "qatflow.cli.cluster",
)

DESCRIPTION = """\
Quantization-aware training for Keras 3 models, to TensorRT-ready INT8 ONNX.

Typical flow:
  qatflow quantize model.keras --output q.keras --calibration-data fashion-mnist
  qatflow export q.keras --output q.onnx
  qatflow validate q.onnx
  qatflow run --output runs/local          # the whole pipeline, locally

Every pipeline step is also a command (prepare-data, prepare-model, finetune, build-engine,
evaluate, compare): `qatflow finetune --help` shows the whole flow by hand.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered command."""
    parser = argparse.ArgumentParser(
        prog="qatflow",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qatflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from qatflow.cli import options
    from qatflow.errors import QatflowError

    try:
        options.apply(args)
        return int(args.func(args) or 0)
    except QatflowError as err:
        print(f"qatflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qatflow {args.command}: interrupted", file=sys.stderr)
        return 130
