"""TensorFlow's C++ start-up lines stay off the command line; real errors still show."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from qatflow import tf_quiet

VENV_BIN = Path(sys.executable).parent
# As TensorFlow 2.21 prints them on a machine without a GPU (one of each kind).
NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796136555.682206   11618 port.cc:153] oneDNN custom operations are on. You "
    "may see slightly different numerical results due to floating-point round-off errors.",
    "I0000 00:00:1796136555.686195   11618 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.",
    "I0000 00:00:1796136556.349733   11618 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.",
    "E0000 00:00:1796136561.045462   11618 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
]
REAL = [
    "E0000 00:00:1796136561.045462   11618 op_kernel.cc:1857] OP_REQUIRES failed: out of memory",
    "F0000 00:00:1796136561.045462   11618 port.cc:12] Check failed: fatal",
    "Traceback (most recent call last):",
    "ImportError: libtensorflow_framework.so.2: cannot open shared object file",
]
# Fragments of the noise lines, to look for in a real command's stderr.
FRAGMENTS = ("absl::InitializeLog", "oneDNN", "cudart_stub", "cpu_feature_guard", "cuInit")


def test_known_notices_are_noise_and_nothing_else() -> None:
    assert all(tf_quiet.is_noise(line) for line in NOISE)
    assert not any(tf_quiet.is_noise(line) for line in REAL)


def test_quiet_stderr_writes_back_what_is_not_noise(capfd: pytest.CaptureFixture[str]) -> None:
    with tf_quiet.quiet_stderr():
        os.write(2, "".join(f"{line}\n" for line in NOISE + REAL).encode())
        os.write(2, b"a last line without a newline")
    err = capfd.readouterr().err
    assert err.splitlines() == [*REAL, "a last line without a newline"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", tf_quiet.ENV)}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # as a user's shell has it: TF probes CUDA
    return {**env, "QATFLOW_NO_PROGRESS": "1", **extra}


def test_the_hook_quiets_the_first_import_and_steps_aside(tmp_path: Path) -> None:
    """A stand-in ``tensorflow`` that writes noise and a real error from "C++" at import."""
    package = tmp_path / "fake" / "tensorflow"
    package.mkdir(parents=True)
    lines = "".join(f"{line}\n" for line in [NOISE[0], NOISE[2], REAL[0]])
    (package / "__init__.py").write_text(
        textwrap.dedent(f"""
        import os
        os.write(2, {lines.encode()!r})
        class config:
            @staticmethod
            def list_physical_devices():
                os.write(2, {(NOISE[5] + chr(10)).encode()!r})
                return []
        """)
    )
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path / "fake")!r})
        from qatflow import tf_quiet
        assert tf_quiet.install()
        import tensorflow
        assert type(tensorflow.__loader__).__name__ != "_QuietLoader"
        assert not any(type(f).__name__ == "_QuietFinder" for f in sys.meta_path)
        print("imported", tensorflow.__name__)
    """)
    quiet = subprocess.run(
        [sys.executable, "-c", script], env=_env(), capture_output=True, text=True, check=True
    )
    assert quiet.stdout == "imported tensorflow\n"
    assert quiet.stderr.splitlines() == [REAL[0]]
    raw = subprocess.run(
        [sys.executable, "-c", script.replace("assert tf_quiet.install()", "tf_quiet.install()")],
        env=_env(**{tf_quiet.ENV: "1"}),
        capture_output=True,
        text=True,
        check=True,
    )
    assert raw.stderr.splitlines() == [NOISE[0], NOISE[2], REAL[0]]  # no device probe either


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    keras.Model(inputs, keras.layers.Dense(3, name="logits")(x), name="tiny").save(
        root / "tiny.keras"
    )
    rng = np.random.default_rng(0)
    np.save(root / "calibration.npy", rng.random((32, 8, 8, 1), dtype=np.float32))
    np.save(root / "wrong.npy", rng.random((8, 5, 5, 1), dtype=np.float32))
    return root


def _qatflow(tiny: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "qatflow"), *argv],
        cwd=tiny,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_qatflow_quantize_prints_no_tensorflow_notices(tiny: Path) -> None:
    done = _qatflow(
        tiny, "quantize", "tiny.keras", "-o", "q.keras", "--calibration-data", "calibration.npy"
    )
    assert done.returncode == 0, done.stderr
    assert "wrote q.keras" in done.stdout
    assert not [line for line in done.stderr.splitlines() if any(f in line for f in FRAGMENTS)]

    # A bad input found after TensorFlow loaded: the one-line error, and still no notices.
    bad = _qatflow(
        tiny, "quantize", "tiny.keras", "-o", "bad.keras", "--calibration-data", "wrong.npy"
    )
    assert bad.returncode == 2
    assert "qatflow quantize: error: calibration data wrong.npy gives images of shape" in (
        bad.stderr
    )
    assert not any(fragment in bad.stderr for fragment in FRAGMENTS), bad.stderr


def test_qatflow_tf_logs_keeps_the_raw_output(tiny: Path) -> None:
    done = _qatflow(
        tiny,
        "quantize",
        "tiny.keras",
        "-o",
        "raw.keras",
        "--calibration-data",
        "calibration.npy",
        **{tf_quiet.ENV: "1"},
    )
    assert done.returncode == 0, done.stderr
    # What the other test proves absent is really printed by this TensorFlow. Which notices
    # depends on the CPU: TensorFlow turns oneDNN on by default only with AVX-512 VNNI, BF16
    # or AMX, so an AVX2-only AMD prints no oneDNN line.
    assert "absl::InitializeLog" in done.stderr
    assert sum(fragment in done.stderr for fragment in FRAGMENTS) >= 2, done.stderr
