"""Demo FP32 baseline pretraining and (QAT) fine-tuning."""

from qatflow.training.config import TrainingError
from qatflow.training.demo_model import DEMO_MODEL_VERSION, build_demo_model
from qatflow.training.finetune import FinetuneResult, finetune
from qatflow.training.pretrain import Recipe, cache_key, pretrain
from qatflow.training.schedules import WarmupSchedule

__all__ = [
    "DEMO_MODEL_VERSION",
    "FinetuneResult",
    "Recipe",
    "TrainingError",
    "WarmupSchedule",
    "build_demo_model",
    "cache_key",
    "finetune",
    "pretrain",
]
