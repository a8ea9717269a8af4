"""The ``qatflow`` console script: one module per command group, each with ``register``.

Commands are thin: they parse arguments, call one function of ``qatflow.steps`` (``validate``:
``qatflow.onnx.validate``), and print where the results went. Errors that qatflow raises on purpose
(``QatflowError``) print as one line without a traceback and exit with status 2.

The library's own groups are ``COMMAND_MODULES``. Packages above the library add theirs as
entry points of the group ``COMMAND_GROUP``, each a ``register(subparsers)`` function: the
pipeline package (``qatflow_pipelines.cli``) adds run, compile, submit and schedule that way,
so the library never imports it. An entry point whose package is not installed is skipped.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import sys
from collections.abc import Callable, Iterator, Sequence

from qatflow import __version__, tf_quiet

COMMAND_MODULES = ("qatflow.cli.toolkit", "qatflow.cli.steps")
COMMAND_GROUP = "qatflow.commands"
Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

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
    for register in installed_commands():
        register(subparsers)
    return parser


def installed_commands() -> Iterator[Register]:
    """The ``register`` functions of the ``COMMAND_GROUP`` entry points, in their order.

    An entry point whose own module or package is missing (e.g. qatflow installed without
    ``qatflow_pipelines``) is skipped; any other import error propagates.
    """
    for entry_point in importlib.metadata.entry_points(group=COMMAND_GROUP):
        parts = entry_point.module.split(".")
        try:
            register = entry_point.load()
        except ModuleNotFoundError as err:
            if err.name in {".".join(parts[: n + 1]) for n in range(len(parts))}:
                continue
            raise
        yield register


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    tf_quiet.install()  # before TensorFlow loads: no C++ start-up lines (QATFLOW_TF_LOGS=1)
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
        # An interrupt inside an import (TensorFlow's) leaves half-built objects whose
        # finalizers fail at exit; their "Exception ignored" tracebacks would bury the line above.
        sys.unraisablehook = _ignore_unraisable
        return 130


def _ignore_unraisable(_: object) -> None:
    """Drop an exception raised where nothing can catch it (a finalizer at exit)."""
