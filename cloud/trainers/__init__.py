"""Trainer plug-ins of the distillation worker, registered explicitly (see base.py)."""

from cloud.trainers.akd import AkdTrainer, AkdTrainerConfig
from cloud.trainers.base import JobContext, JobInterrupted, Trainer, TrainResult
from cloud.trainers.tiny import TinyKdConfig, TinyKdTrainer
from shared.registry import Registry

TRAINERS: Registry[Trainer] = Registry("trainer")
TRAINERS.register("tiny-kd", TinyKdConfig, TinyKdTrainer)
TRAINERS.register("akd", AkdTrainerConfig, AkdTrainer)

__all__ = ["TRAINERS", "AkdTrainer", "AkdTrainerConfig", "JobContext", "JobInterrupted",
           "TinyKdConfig", "TinyKdTrainer", "TrainResult", "Trainer"]
