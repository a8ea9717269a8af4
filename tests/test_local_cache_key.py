"""Local runs key kfp.local's step cache on qatflow's source: a code change means a cache miss.

No ``from __future__ import annotations`` here: KFP reads the component's annotations as types.
"""

from pathlib import Path

import pytest
from kfp import dsl, local
from qatflow_pipelines.runner.local_docker import images_fingerprint
from qatflow_pipelines.runner.local_run import source_fingerprint

from qatflow.errors import PipelineError


def test_fingerprint_follows_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "fingerprinted_pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    module = package / "sub" / "step.py"
    module.write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    first = source_fingerprint(("fingerprinted_pkg",))
    assert source_fingerprint(("fingerprinted_pkg",)) == first
    module.write_text("VALUE = 2\n")
    changed = source_fingerprint(("fingerprinted_pkg",))
    assert changed != first
    (package / "sub" / "other.py").write_text("")
    assert source_fingerprint(("fingerprinted_pkg",)) != changed


def test_fingerprint_leaves_test_folders_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "tested_pkg"
    (package / "step" / "tests").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    test_module = package / "step" / "tests" / "test_step.py"
    test_module.write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    first = source_fingerprint(("tested_pkg",))
    test_module.write_text("VALUE = 2\n")
    assert source_fingerprint(("tested_pkg",)) == first


def test_fingerprint_of_a_missing_package() -> None:
    with pytest.raises(PipelineError, match="no_such_qatflow_package"):
        source_fingerprint(("no_such_qatflow_package",))


@dsl.component(base_image="python:3.11")
def count_call(log: str) -> str:
    """Append a line to ``log`` each time the step really runs."""
    with open(log, "a") as handle:
        handle.write("ran\n")
    return log


def _pipeline(log: str, code_version: str) -> None:
    @dsl.pipeline(name="cache-key")
    def cached() -> None:
        task = count_call(log=log)
        task.set_caching_options(enable_caching=True)
        task.set_env_variable("QATFLOW_CODE_VERSION", code_version)

    cached()


def test_kfp_local_cache_misses_when_the_code_version_changes(tmp_path: Path) -> None:
    """The mechanism build_pipeline(code_version=...) relies on, checked on kfp.local itself."""
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "root"),
        enable_caching=True,
    )
    log = tmp_path / "calls.log"
    _pipeline(str(log), "v1")
    _pipeline(str(log), "v1")
    assert log.read_text().count("ran") == 1  # same code: cache hit
    _pipeline(str(log), "v2")
    assert log.read_text().count("ran") == 2  # new code: the step runs again


def test_docker_runs_key_on_the_image_ids() -> None:
    """``--runner docker`` adds this to the code version: a rebuilt image under the same tag."""
    ids = {"qatflow-tf:1": "sha256:aa", "qatflow-trt:1": "sha256:bb"}
    first = images_fingerprint(ids)
    assert images_fingerprint(dict(reversed(ids.items()))) == first
    assert images_fingerprint({**ids, "qatflow-tf:1": "sha256:cc"}) != first
