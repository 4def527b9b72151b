"""Training GPT-2 on Ray Train: `zhchat train` (see trainer.py for the driver, loop.py for
what each worker runs)."""

from .trainer import TrainingDiverged, run_train, train

__all__ = ["run_train", "train", "TrainingDiverged"]
