"""Options shared by several commands: defined once here, applied once by ``main``."""

from __future__ import annotations

import argparse

CUSTOM_OBJECTS_HELP = (
    "import MODULE and register ATTR (a custom layer/model class, a function, or a dict of "
    "them) so that model files using it load; repeatable. The current directory is searched "
    "first. Importing the module also runs its own registrations (e.g. "
    "qatflow.register_layer_config to quantize a custom layer)"
)


def add_custom_objects(parser: argparse.ArgumentParser) -> None:
    """Add ``--custom-objects MODULE:ATTR`` to a command that loads models."""
    parser.add_argument(
        "--custom-objects",
        action="append",
        default=[],
        metavar="MODULE:ATTR",
        help=CUSTOM_OBJECTS_HELP,
    )


def apply(args: argparse.Namespace) -> None:
    """Act on the shared options ``args`` carries, before the command runs."""
    if getattr(args, "custom_objects", None):
        from qatflow.models import register_custom_objects

        register_custom_objects(args.custom_objects)
