"""``qatflow run``'s profiles and runners are written once: runner, CLI and docs agree."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from qatflow_pipelines.qat_int8.parameters import check_arguments
from qatflow_pipelines.runner import profiles
from qatflow_pipelines.runner.local_run import run_local
from qatflow_pipelines.runner.profiles import (
    DEFAULT_PROFILE,
    DEFAULT_RUNNER,
    PROFILES,
    RUNNERS,
    SUMMARIES,
)

from qatflow.cli import build_parser
from qatflow.params import PIPELINE_PARAMETERS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "pipeline.md"


def _run_option(option: str) -> tuple[object, tuple[str, ...] | None, str]:
    """The default, choices and help of an option of ``qatflow run``."""
    parser = build_parser()
    (run,) = [
        action.choices["run"]
        for action in parser._actions
        if isinstance(action.choices, dict) and "run" in action.choices
    ]
    (action,) = [action for action in run._actions if option in action.option_strings]
    choices = tuple(action.choices) if action.choices is not None else None
    return action.default, choices, action.help or ""


def test_the_cli_offers_the_profiles_and_runners_of_the_runner() -> None:
    assert _run_option("--profile")[:2] == (DEFAULT_PROFILE, tuple(PROFILES))
    assert _run_option("--runner")[:2] == (DEFAULT_RUNNER, RUNNERS)
    defaults = inspect.signature(run_local).parameters
    assert defaults["profile"].default == DEFAULT_PROFILE
    assert defaults["runner"].default == DEFAULT_RUNNER
    assert set(SUMMARIES) == set(PROFILES)


@pytest.mark.parametrize("option, name", [("--epochs", "epochs"), ("--pretrain-epochs", None)])
def test_the_help_shows_the_default_profile(option: str, name: str | None) -> None:
    name = name or option.removeprefix("--").replace("-", "_")
    value = PROFILES[DEFAULT_PROFILE][name]
    assert _run_option(option)[2].endswith(f"(default profile: {value})")


def test_run_help_lists_every_profile(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in PROFILES:
        assert f"{name} {profiles.settings(name)}: " in text


@pytest.mark.parametrize("name", list(PROFILES))
def test_a_profile_sets_valid_pipeline_parameters(name: str) -> None:
    assert set(PROFILES[name]) <= set(PIPELINE_PARAMETERS)
    check_arguments(PROFILES[name])


@pytest.mark.parametrize("name", list(PROFILES))
def test_the_docs_table_states_each_profile(name: str) -> None:
    rows = re.findall(rf"^\| `{name}` \| `([^`]*)`", DOCS.read_text(encoding="utf-8"), re.M)
    assert rows == [profiles.settings(name)], f"docs/pipeline.md's row of profile {name}"
