"""The presets of a local run (``qatflow run --profile``) and its task runners (``--runner``).

The one place they are written: ``run_local`` applies them, ``qatflow run`` takes its choices
and help from them, and tests/test_run_profiles.py checks docs/pipeline.md against them.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from qatflow.params import MODEL

DEFAULT_PROFILE = "default"
# Pipeline parameters that a profile sets; the pipeline's defaults fill in the rest.
PROFILES: Mapping[str, Mapping[str, object]] = MappingProxyType(
    {
        DEFAULT_PROFILE: MappingProxyType(
            {"pretrain_epochs": MODEL.pretrain_epochs, "epochs": 1},
        ),
        # 4 epochs of 2000 images (63 steps) learn to about 70 % top-1; one stayed near chance.
        "smoke": MappingProxyType(
            {
                "limit": 2000,
                "eval_max_batches": 8,
                "pretrain_epochs": 4,
                "epochs": 1,
                "qat_steps_per_epoch": 10,
                "calibration_batches": 4,
                "latency_iterations": 20,
            }
        ),
    }
)
SUMMARIES: Mapping[str, str] = MappingProxyType(
    {
        DEFAULT_PROFILE: "the full demo: all of Fashion-MNIST, the demo CNN pretrained with its "
        "full recipe (>= 91 % top-1, cached after the first run), then QAT; about 6.5 minutes "
        "on 2 idle CPU cores the first time",
        "smoke": "a quick end-to-end check: small splits, a few QAT steps and pretraining to "
        "about 70 % top-1; 2-4 minutes",
    }
)


def settings(profile: str) -> str:
    """The parameters ``profile`` sets, as ``name=value`` words (the help and the docs show it)."""
    return " ".join(f"{name}={value}" for name, value in PROFILES[profile].items())


DEFAULT_RUNNER = "subprocess"  # kfp.local's SubprocessRunner: tasks in this Python
DOCKER_RUNNER = "docker"  # kfp.local's DockerRunner: tasks in their images (local_docker)
RUNNERS = (DEFAULT_RUNNER, DOCKER_RUNNER)
