"""Every example in README.md and docs/ parses against the code it documents.

- ``qatflow ...`` command lines (in any code block but ``text`` output samples) go through the
  real argument parser; for ``qatflow run`` the values go through the pipeline's parameter rules
  too, and for ``submit``/``schedule`` the ``--param`` names must be pipeline parameters and
  ``--host`` a valid URL.
- ``make <target>`` lines name a target of the Makefile.
- Python blocks compile; every ``qatflow`` name they import exists, and every call of an
  imported function or class binds to its signature (so a renamed keyword fails here).
- The README's local examples run: the step-by-step flow (prepare-data ... compare), the
  toolkit lines (quantize, export, validate) and the Python API block, on a tiny ``.npz``
  instead of Fashion-MNIST (only dataset names and the reader's own model file are
  substituted); every command exits 0 and writes what its ``--output`` names (~1 min).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qatflow_pipelines.cli.pipeline import _RUN_PARAMETERS
from qatflow_pipelines.qat_int8.parameters import check_arguments

from qatflow.cli import build_parser
from qatflow.cluster import normalize_host

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_MAKE_TARGET = re.compile(r"^([\w-]+):", re.M)


def _blocks(language: str | None = None) -> Iterator[tuple[str, str]]:
    """(id, code) of every fenced block but ``text`` ones (samples of output), or of those
    tagged ``language``."""
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in _FENCE.finditer(text):
            if match[1] == language or (language is None and match[1] != "text"):
                line = text[: match.start()].count("\n") + 1
                yield f"{doc.relative_to(ROOT)}:{line}", match[2]


def _command_lines(program: str) -> list[tuple[str, list[str]]]:
    """(id, argv) of every line of a code block that runs ``program``, comments dropped."""
    found = []
    for where, code in _blocks():
        joined = code.replace("\\\n", " ")
        for number, line in enumerate(joined.splitlines()):
            words = shlex.split(line, comments=True)
            # "qatflow run: error: ..." is a sample of output, not a command.
            if words[:1] == [program] and not "".join(words[1:2]).endswith(":"):
                found.append((f"{where}+{number}", words[1:]))
    return found


QATFLOW = _command_lines("qatflow")
MAKE = _command_lines("make")
PYTHON = list(_blocks("python"))


def test_the_docs_have_examples_of_each_kind() -> None:
    assert len(QATFLOW) >= 20 and len(MAKE) >= 5 and len(PYTHON) >= 8


def test_the_readme_links_every_doc_and_its_images_exist() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in DOCS[1:]:
        assert f"]({doc.relative_to(ROOT)})" in readme, f"README.md does not link {doc.name}"
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme):
        assert (ROOT / image).is_file(), f"README.md shows {image}, which does not exist"


@pytest.mark.parametrize(("where", "argv"), QATFLOW, ids=[where for where, _ in QATFLOW])
def test_qatflow_command_lines_parse(where: str, argv: list[str]) -> None:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{where}: `qatflow {shlex.join(argv)}` is rejected (exit {exit_.code})")
    if args.command == "run":
        given = {name: getattr(args, name) for name in _RUN_PARAMETERS}
        check_arguments({name: value for name, value in given.items() if value is not None})
    if args.command in ("submit", "schedule"):
        if args.host:
            normalize_host(args.host)
        if args.package is None:
            unknown = {name for name, _ in args.params} - set(_pipeline_parameters())
            assert not unknown, f"{where}: no pipeline parameter(s) {sorted(unknown)}"


def _pipeline_parameters() -> list[str]:
    from qatflow_pipelines.qat_int8.pipeline import build_pipeline

    return list(build_pipeline().component_spec.inputs or {})


@pytest.mark.parametrize(("where", "argv"), MAKE, ids=[where for where, _ in MAKE])
def test_make_lines_name_real_targets(where: str, argv: list[str]) -> None:
    targets = set(_MAKE_TARGET.findall((ROOT / "Makefile").read_text()))
    for target in argv:
        assert target in targets, f"{where}: `make {target}` is not a Makefile target"


@pytest.mark.parametrize(("where", "code"), PYTHON, ids=[where for where, _ in PYTHON])
def test_python_examples_use_the_real_api(where: str, code: str) -> None:
    tree = ast.parse(code, filename=where)
    names = _imported(tree, where)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            target = _resolve(node.func, names)
            if target is not None and callable(target):
                _bind(target, node, where)


def _imported(tree: ast.Module, where: str) -> dict[str, Any]:
    """Local name -> object for every ``qatflow`` import in the block (which must resolve)."""
    names: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qatflow"):
            module = importlib.import_module(str(node.module))
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}: {node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("qatflow"):
                    names[alias.asname or alias.name.split(".")[0]] = importlib.import_module(
                        alias.name.split(".")[0]
                    )
    return names


def _resolve(func: ast.expr, names: dict[str, Any]) -> Any:
    """The object a call's ``func`` names, for ``name(...)`` and ``module.attr(...)``."""
    if isinstance(func, ast.Name):
        return names.get(func.id)
    if isinstance(func, ast.Attribute):
        owner = _resolve(func.value, names)
        if inspect.ismodule(owner) or inspect.isclass(owner):
            assert hasattr(owner, func.attr), f"{owner.__name__} has no {func.attr}"
            return getattr(owner, func.attr)
    return None


def _bind(target: Any, call: ast.Call, where: str) -> None:
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    if any(isinstance(arg, ast.Starred) for arg in call.args) or any(
        keyword.arg is None for keyword in call.keywords
    ):
        return
    args = [object()] * len(call.args)
    kwargs = {keyword.arg: object() for keyword in call.keywords if keyword.arg}
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        pytest.fail(f"{where}: {getattr(target, '__qualname__', target)}{signature}: {err}")


# --- the README's local examples, executed on smoke data ------------------------------------

README = ROOT / "README.md"
# The only things a run changes in what the README shows: the dataset (a tiny .npz instead
# of Fashion-MNIST) and the model file the toolkit lines assume the reader has.
SMOKE_DATA = "smoke.npz"
SUBSTITUTE = {"fashion-mnist": SMOKE_DATA, "model.keras": "user-model.keras"}


def _readme_block(first_command: str) -> list[list[str]]:
    """The argv of every ``qatflow`` line of the README's block that contains
    ``qatflow <first_command>``, in order."""
    for _, code in _blocks():
        lines = [shlex.split(line, comments=True) for line in code.splitlines()]
        commands = [words[1:] for words in lines if words[:1] == ["qatflow"]]
        if any(argv[:1] == [first_command] for argv in commands):
            return commands
    raise AssertionError(f"README.md has no block with `qatflow {first_command}`")


def _outputs(argv: list[str]) -> list[Path]:
    """What a command line says it writes: its ``--output``/``-o``, and a report's files."""
    for flag in ("--output", "-o"):
        if flag in argv:
            out = Path(argv[argv.index(flag) + 1])
            if argv[0] == "compare":
                return [out / name for name in ("comparison.json", "report.md", "report.html")]
            return [out]
    return []


@pytest.fixture
def smoke_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pretrain_cache: Path) -> Path:
    """A working directory with the smoke data and a small user model, as the README's
    relative paths assume; an empty pretraining cache, so `prepare-model demo` really trains."""
    from tests.chain import write_npz
    from tests.model_zoo import small_cnn

    write_npz(tmp_path / SMOKE_DATA)
    small_cnn(input_shape=(16, 16, 1)).save(tmp_path / SUBSTITUTE["model.keras"])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run_readme_lines(commands: list[list[str]], capsys: pytest.CaptureFixture[str]) -> str:
    """Run each command line in-process; every one must exit 0 and write its outputs.
    Returns what they printed."""
    from qatflow.cli import main

    printed = []
    for argv in commands:
        argv = [SUBSTITUTE.get(word, word) for word in argv]
        code = main(argv)
        captured = capsys.readouterr()
        printed.append(captured.out)
        assert code == 0, f"`qatflow {shlex.join(argv)}` exited {code}: {captured.err[-2000:]}"
        for path in _outputs(argv):
            assert path.exists(), f"`qatflow {shlex.join(argv)}` did not write {path}"
    return "".join(printed)


def test_readme_step_by_step_flow_runs(smoke_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    commands = _readme_block("prepare-data")
    assert [argv[0] for argv in commands][:4] == [
        "prepare-data",
        "prepare-model",
        "quantize",
        "finetune",
    ]
    assert commands[-1][0] == "compare"
    _run_readme_lines(commands, capsys)
    from qatflow.comparison import Comparison

    report = smoke_dir / "report"
    assert Comparison.load_json(report / "comparison.json").variants == [
        "fp32",
        "ptq_int8",
        "qat_int8",
    ]
    assert list((report / "plots").glob("*.png"))
    markdown = (report / "report.md").read_text()
    assert "## Q/DQ placement" in markdown
    assert f"| Dataset | {SMOKE_DATA} (npz);" in markdown  # compare --dataset


def test_readme_toolkit_lines_run(smoke_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # run/compile/submit/schedule take minutes or a cluster: their lines are parsed above.
    commands = [argv for argv in _readme_block("validate") if argv[0] not in _PIPELINE_COMMANDS]
    assert [argv[0] for argv in commands] == ["quantize", "export", "validate"]
    assert "q.onnx: OK" in _run_readme_lines(commands, capsys)


_PIPELINE_COMMANDS = ("run", "compile", "submit", "schedule")


def test_readme_python_api_example_runs(
    smoke_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    from tests.model_zoo import small_cnn

    (code,) = [code for _, code in _blocks("python") if "qatflow.quantize_model(" in code]
    namespace = {
        "model": small_cnn(input_shape=(16, 16, 1)),
        "calibration_batches": np.random.default_rng(0).random((64, 16, 16, 1), "float32"),
    }
    exec(compile(code, "README.md", "exec"), namespace)
    assert Path("model_int8.onnx").is_file()
    out = capsys.readouterr().out
    assert "stem_conv" in out  # the placement summary
    assert "model_int8.onnx: OK" in out  # TensorRT's import rules hold
