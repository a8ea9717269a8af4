"""Test-wide settings: CPU only, quiet TensorFlow, no progress bars in captured output."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("QATFLOW_NO_PROGRESS", "1")
os.environ.setdefault(
    "MLFLOW_TRACKING_URI", "sqlite:///" + os.path.join(os.getcwd(), ".pytest-mlflow.db")
)
