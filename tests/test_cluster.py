"""qatflow.cluster and its CLI against a local stand-in of the KFP v2beta1 API.

No ``from __future__ import annotations`` here: KFP reads the component annotations as types.
"""

import argparse
import re
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl
from qatflow_pipelines.cli.cluster import register
from tests.kfp_api_standin import KfpApiStandIn

from qatflow import cluster
from qatflow.cluster import (
    apply_gpu_settings,
    check_arguments,
    parse_arguments,
    pipeline_inputs,
    schedule,
    submit,
    validate_cron,
)
from qatflow.errors import PipelineError


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def repeat_text(text: str, times: int) -> str:
    return text * times


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def shout(message: str, loud: bool) -> str:
    return message.upper() if loud else message


@dsl.pipeline(name="tiny-pipeline")
def tiny_pipeline(text: str, times: int = 2, loud: bool = False, scale: float = 1.0) -> None:
    repeated = repeat_text(text=text, times=times)
    shout(message=repeated.output, loud=loud)


@dsl.pipeline(name="tiny-gpu-pipeline")
def tiny_gpu_pipeline(text: str = "a") -> None:
    task = repeat_text(text=text, times=1)
    apply_gpu_settings(task, node_selector={"nvidia.com/gpu.product": "NVIDIA-A10G"})
    plain = shout(message=task.output, loud=True)
    apply_gpu_settings(plain, accelerator_limit=2, toleration=None)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipeline") / "tiny.yaml"
    compiler.Compiler().compile(tiny_pipeline, str(path))
    return path


@pytest.fixture
def kfp_api() -> Iterator[KfpApiStandIn]:
    with KfpApiStandIn() as standin:
        yield standin


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


# -- cron --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("0 0 2 * * *", "0 0 2 * * *"),
        ("  0  0 2 * *\t* ", "0 0 2 * * *"),
        ("*/15 * * * * *", "*/15 * * * * *"),
        ("0 30 9 ? * MON-FRI", "0 30 9 ? * MON-FRI"),
        ("0 0 0 1,15 jan-jun/2 *", "0 0 0 1,15 jan-jun/2 *"),
        ("59 59 23 31 12 6", "59 59 23 31 12 6"),
        ("0 5/10 * * * 0", "0 5/10 * * * 0"),
        ("@daily", "@daily"),
        ("@every 1h30m", "@every 1h30m"),
    ],
)
def test_valid_cron(expr: str, expected: str) -> None:
    assert validate_cron(expr) == expected


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("0 2 * * *", "did you mean '0 0 2 \\* \\* \\*'"),
        ("60 * * * * *", "seconds field '60': value 60 is outside 0-59"),
        ("0 60 * * * *", "minutes field"),
        ("0 0 24 * * *", "hours field '24': value 24 is outside 0-23"),
        ("0 0 0 0 * *", "day of month field '0': value 0 is outside 1-31"),
        ("0 0 0 * 13 *", "month field '13'"),
        ("0 0 0 * FOO *", "'FOO' is not a number or one of JAN/FEB"),
        ("0 0 0 * * 7", "day of week field '7': value 7 is outside 0-6"),
        ("0 0 0 * * MON-XYZ", "'XYZ' is not a number or one of SUN/MON"),
        ("*/0 * * * * *", "step '0' must be a positive integer"),
        ("0 0 5-2 * * *", "range start 5 is after its end 2"),
        ("0 0 2 * * * 2026", "has 7 fields, expected 6"),
        ("", "empty"),
        ("@often", "unknown descriptor"),
        ("@every soon", "not a duration"),
        ("@every 10ms", "at least one second"),
    ],
)
def test_invalid_cron(expr: str, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        validate_cron(expr)


# -- parameters --------------------------------------------------------------------------------


def test_pipeline_inputs_read_from_compiled_yaml(package: Path) -> None:
    inputs = pipeline_inputs(package)
    assert set(inputs) == {"text", "times", "loud", "scale"}
    assert inputs["times"]["parameterType"] == "NUMBER_INTEGER"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"text": "a", "epochs": 3}, "unknown pipeline parameter.*epochs.*accepts: loud, scale"),
        ({"times": 3}, "text have no default"),
        ({"text": "a", "times": "3"}, "times expects NUMBER_INTEGER, got str"),
        ({"text": "a", "loud": 1}, "loud expects BOOLEAN"),
    ],
)
def test_bad_arguments_are_named(package: Path, arguments: dict, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        check_arguments(package, arguments)


def test_parse_arguments_converts_to_pipeline_types(package: Path) -> None:
    assert parse_arguments(
        package, {"text": "hi", "times": "3", "loud": "true", "scale": "0.5"}
    ) == {"text": "hi", "times": 3, "loud": True, "scale": 0.5}
    with pytest.raises(PipelineError, match="times='three': expected NUMBER_INTEGER"):
        parse_arguments(package, {"text": "hi", "times": "three"})


def test_package_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"missing\.yaml"):
        pipeline_inputs(tmp_path / "missing.yaml")
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(PipelineError, match=r"notes\.txt must be a compiled"):
        pipeline_inputs(notes)
    other = tmp_path / "other.yaml"
    other.write_text("just: a mapping\n")
    with pytest.raises(PipelineError, match=r"other\.yaml is not a compiled KFP pipeline"):
        pipeline_inputs(other)


# -- submit and schedule -----------------------------------------------------------------------


def test_submit_sends_spec_parameters_and_experiment(kfp_api: KfpApiStandIn, package: Path) -> None:
    run_id = submit(kfp_api.url, package, arguments={"text": "hi", "times": 3}, run_name="smoke")
    (experiment,) = kfp_api.bodies("POST", "/experiments")
    assert experiment["display_name"] == "qatflow"
    (run,) = kfp_api.bodies("POST", "/runs")
    assert run["display_name"] == "smoke"
    assert run["experiment_id"] == next(iter(kfp_api.experiments))
    assert run["pipeline_spec"]["pipelineInfo"]["name"] == "tiny-pipeline"
    assert run["runtime_config"]["parameters"] == {"text": "hi", "times": 3}
    assert len(run_id) == 32


def test_schedule_sends_cron_concurrency_and_catchup(kfp_api: KfpApiStandIn, package: Path) -> None:
    first = schedule(
        kfp_api.url,
        package,
        cron=" 0 0 2 * * * ",
        arguments={"text": "nightly"},
        experiment="qat-nightly",
        job_name="nightly",
        max_concurrency=2,
    )
    second = schedule(
        kfp_api.url,
        package,
        cron="@weekly",
        arguments={"text": "weekly", "loud": True},
        experiment="qat-nightly",
        job_name="weekly",
        no_catchup=False,
    )
    assert first != second
    # The experiment is created once, then found by name.
    assert len(kfp_api.bodies("POST", "/experiments")) == 1
    (experiment_id,) = kfp_api.experiments
    nightly, weekly = kfp_api.bodies("POST", "/recurringruns")
    assert nightly["trigger"] == {"cron_schedule": {"cron": "0 0 2 * * *"}}
    assert nightly["experiment_id"] == weekly["experiment_id"] == experiment_id
    assert int(nightly["max_concurrency"]) == 2
    assert nightly["no_catchup"] is True
    assert nightly["mode"] == "ENABLE"
    assert nightly["display_name"] == "nightly"
    assert nightly["runtime_config"]["parameters"] == {"text": "nightly"}
    assert nightly["pipeline_spec"]["root"]["dag"]["tasks"].keys() == {"repeat-text", "shout"}
    assert weekly["trigger"]["cron_schedule"]["cron"] == "@weekly"
    assert weekly["no_catchup"] is False


def test_unreachable_host_is_named(package: Path) -> None:
    host = _closed_port_url()
    with pytest.raises(PipelineError, match=f"KFP API server {host} is unreachable"):
        submit(host, package, arguments={"text": "a"})


def test_bad_input_fails_before_contacting_the_host(package: Path) -> None:
    host = _closed_port_url()
    with pytest.raises(PipelineError, match="did you mean"):
        schedule(host, package, cron="0 2 * * *", arguments={"text": "a"})
    with pytest.raises(PipelineError, match="unknown pipeline parameter"):
        schedule(host, package, cron="@daily", arguments={"text": "a", "typo": 1})
    with pytest.raises(PipelineError, match="max_concurrency"):
        schedule(host, package, cron="@daily", arguments={"text": "a"}, max_concurrency=0)


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        ("kfp.example.com:8080", "has no scheme: pass http://kfp.example.com:8080 or https://"),
        ("ftp://kfp.example.com", "the scheme must be http or https, not ftp"),
        ("http://kfp.example.com:99999", "invalid port"),
        ("http://kfp.example.com:0", "the port must be 1-65535"),
        ("https://:8080", "has no host name"),
    ],
)
def test_malformed_host_is_refused_before_connecting(
    host: str, problem: str, package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_connection(*args: object, **kwargs: object) -> None:
        raise AssertionError("connected to a malformed host")

    monkeypatch.setattr(cluster, "check_reachable", no_connection)
    with pytest.raises(PipelineError, match=re.escape(problem)):
        submit(host, package, arguments={"text": "a"})
    with pytest.raises(PipelineError, match=re.escape(problem)):
        schedule(host, package, cron="@daily", arguments={"text": "a"})
    # The CLI checks it before compiling the pipeline.
    monkeypatch.setitem(sys.modules, "qatflow_pipelines.runner.compile", types.ModuleType("unused"))
    args = _parser().parse_args(["submit", "--host", host, "--param", "text=x"])
    with pytest.raises(PipelineError, match=re.escape(problem)):
        args.func(args)


def test_a_valid_host_is_kept_without_its_trailing_slash() -> None:
    assert cluster.normalize_host(" http://127.0.0.1:8080/ ") == "http://127.0.0.1:8080"
    assert cluster.normalize_host("https://kfp.example.com/pipeline") == (
        "https://kfp.example.com/pipeline"
    )


def test_api_rejection_is_reported(kfp_api: KfpApiStandIn, package: Path) -> None:
    kfp_api.failures["/apis/v2beta1/runs"] = (400, "pipeline spec is invalid")
    with pytest.raises(
        PipelineError, match=r"rejected run of .*HTTP 400.*pipeline spec is invalid"
    ):
        submit(kfp_api.url, package, arguments={"text": "a"})


# -- GPU settings ------------------------------------------------------------------------------


def test_gpu_settings_in_compiled_yaml(tmp_path: Path) -> None:
    path = tmp_path / "gpu.yaml"
    compiler.Compiler().compile(tiny_gpu_pipeline, str(path))
    pipeline_spec, platform_spec = yaml.safe_load_all(path.read_text())
    executors = pipeline_spec["deploymentSpec"]["executors"]
    accelerators = {
        name: (accelerator["resourceType"], accelerator["resourceCount"])
        for name, executor in executors.items()
        for accelerator in [executor["container"]["resources"]["accelerator"]]
    }
    assert accelerators == {
        "exec-repeat-text": ("nvidia.com/gpu", "1"),
        "exec-shout": ("nvidia.com/gpu", "2"),
    }
    kubernetes = platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert kubernetes["exec-repeat-text"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert kubernetes["exec-repeat-text"]["nodeSelector"] == {
        "labels": {"nvidia.com/gpu.product": "NVIDIA-A10G"}
    }
    assert "exec-shout" not in kubernetes


def test_gpu_settings_reject_bad_values() -> None:
    with pytest.raises(PipelineError, match=r"toleration for task repeat-text.*tolerationSeconds"):

        @dsl.pipeline(name="bad-toleration")
        def bad_toleration() -> None:
            apply_gpu_settings(
                repeat_text(text="a", times=1), toleration={"key": "x", "tolerationSeconds": 5}
            )

    with pytest.raises(PipelineError, match="accelerator_limit for task repeat-text"):

        @dsl.pipeline(name="bad-limit")
        def bad_limit() -> None:
            apply_gpu_settings(repeat_text(text="a", times=1), accelerator_limit=0)


# -- CLI ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qatflow")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_schedule_help_explains_six_field_cron(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["schedule", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "6 fields, seconds first" in text
    assert "'0 0 2 * * *'" in text
    assert "--param NAME=VALUE" in text


def test_cli_submit_help_lists_the_pipeline_parameters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["submit", "--help"])
    text = capsys.readouterr().out
    assert "parameters of the qatflow pipeline (--param NAME=VALUE):" in text
    assert "  dataset_uri (String, default 'fashion-mnist')" in text
    assert "  accuracy_gate (Float, default 1.0)\n      the accuracy gate in top-1 points" in text
    assert "--param dataset_uri=fashion-mnist" in text  # the example uses a real parameter


def test_cli_submit_converts_params(
    kfp_api: KfpApiStandIn, package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["submit", "--host", kfp_api.url, "--package", str(package), "--experiment", "cli"]
    args = _parser().parse_args([*argv, "--param", "text=a=b", "--param", "times=4", "--no-cache"])
    assert args.func(args) == 0
    (run,) = kfp_api.bodies("POST", "/runs")
    assert run["runtime_config"]["parameters"] == {"text": "a=b", "times": 4}
    assert "submitted run" in capsys.readouterr().out


def test_cli_schedule_defaults(kfp_api: KfpApiStandIn, package: Path) -> None:
    argv = ["schedule", "--host", kfp_api.url, "--package", str(package), "--param", "text=x"]
    args = _parser().parse_args([*argv, "--cron", "0 0 2 * * *"])
    assert args.func(args) == 0
    (recurring,) = kfp_api.bodies("POST", "/recurringruns")
    assert recurring["display_name"] == "qatflow-nightly"
    assert recurring["no_catchup"] is True
    assert int(recurring["max_concurrency"]) == 1


def test_cli_compiles_the_qatflow_pipeline_by_default(
    kfp_api: KfpApiStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled: list[Path] = []

    def compile_pipeline(path: Path) -> None:
        compiler.Compiler().compile(tiny_pipeline, str(path))
        compiled.append(path)

    # Any compiler with the signature of qatflow_pipelines.runner.compile's shows that the CLI
    # compiles to a temp file and cleans it up.
    module = types.ModuleType("qatflow_pipelines.runner.compile")
    module.compile_pipeline = compile_pipeline  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qatflow_pipelines.runner.compile", module)
    args = _parser().parse_args(["submit", "--host", kfp_api.url, "--param", "text=x"])
    assert args.func(args) == 0
    assert len(kfp_api.bodies("POST", "/runs")) == 1
    assert not compiled[0].exists()


def test_cli_rejects_malformed_param(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["submit", "--host", "http://x", "--param", "epochs"])
    assert "must look like NAME=VALUE" in capsys.readouterr().err


def test_cli_requires_a_host(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    args = _parser().parse_args(["submit", "--package", str(package)])
    with pytest.raises(PipelineError, match="no KFP host"):
        args.func(args)
