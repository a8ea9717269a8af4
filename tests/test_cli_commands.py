"""The ``qatflow`` commands: the library's own and those of the ``qatflow.commands`` entry points.

The pipeline package adds run, compile, submit and schedule through an entry point, so the
library never imports it; without that package the other commands still work.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from qatflow import cli

LIBRARY_COMMANDS = [
    "quantize",
    "export",
    "validate",
    "prepare-data",
    "prepare-model",
    "finetune",
    "build-engine",
    "evaluate",
    "compare",
]
PIPELINE_COMMANDS = ["run", "compile", "submit", "schedule"]
# Run in a fresh Python where qatflow_pipelines cannot be imported, as if it were not installed.
WITHOUT_PIPELINES = """
import importlib.abc, sys

class NoPipelines(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "qatflow_pipelines":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoPipelines())
from qatflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(subparsers.choices)


def _entry_point(value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name="test", value=value, group=cli.COMMAND_GROUP)


def test_the_pipeline_commands_come_from_the_entry_point() -> None:
    (entry_point,) = importlib.metadata.entry_points(group=cli.COMMAND_GROUP)
    assert entry_point.value == "qatflow_pipelines.cli:register"
    assert _commands(cli.build_parser()) == LIBRARY_COMMANDS + PIPELINE_COMMANDS


def test_building_the_parser_imports_neither_kfp_nor_tensorflow() -> None:
    code = (
        "import sys; from qatflow.cli import build_parser; build_parser(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'kfp', 'tensorflow', 'keras'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_without_the_pipeline_package_the_other_commands_work() -> None:
    def qatflow(*argv: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", WITHOUT_PIPELINES, *argv]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    help_ = qatflow("--help")
    assert help_.returncode == 0, help_.stderr
    assert "validate" in help_.stdout and "compile" not in help_.stdout
    assert qatflow("validate", "--help").returncode == 0
    run = qatflow("run", "--output", "x")
    assert run.returncode == 2 and "invalid choice: 'run'" in run.stderr


def test_an_entry_point_of_a_missing_package_is_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entry_points = [_entry_point("qatflow_no_such_plugin.cli:register")]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: entry_points)
    assert list(cli.installed_commands()) == []
    assert _commands(cli.build_parser()) == LIBRARY_COMMANDS


def test_a_broken_entry_point_is_not_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "qatflow_broken_plugin.py").write_text(
        "import qatflow_no_such_dependency\n\ndef register(subparsers):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_points = [_entry_point("qatflow_broken_plugin:register")]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: entry_points)
    with pytest.raises(ModuleNotFoundError, match="qatflow_no_such_dependency"):
        cli.build_parser()


def test_an_entry_point_adds_its_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "qatflow_hello_plugin.py").write_text(
        "def register(subparsers):\n"
        "    hello = subparsers.add_parser('hello', help='say hello')\n"
        "    hello.set_defaults(func=lambda args: print('hello') or 7)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_points = [_entry_point("qatflow_hello_plugin:register")]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: entry_points)
    assert _commands(cli.build_parser()) == [*LIBRARY_COMMANDS, "hello"]
    assert cli.main(["hello"]) == 7


INTERRUPTED_COMMAND = """
import sys
from qatflow.cli import main, toolkit

class HalfBuilt:
    def __del__(self):
        raise AttributeError("finalizer of an object an interrupt left half-built")

def interrupted(args):
    toolkit.leftover = HalfBuilt()  # finalized at exit, as TensorFlow's are
    raise KeyboardInterrupt

toolkit.run_export = interrupted
sys.exit(main(["export", "m.keras", "-o", "m.onnx"]))
"""


def test_an_interrupt_exits_130_with_one_line_and_no_finalizer_tracebacks() -> None:
    done = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_COMMAND], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 130
    assert done.stderr == "qatflow export: interrupted\n"
