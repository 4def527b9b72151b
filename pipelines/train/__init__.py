"""Training GPT-2 on Ray Train: `zhchat train` (see trainer.py for the driver, loop.py for
what each worker runs, step.py for the optimizer step itself).

The driver is imported on first use: step.py, model.py and data.py must import on a GPU
box without Ray or the CLI's dependencies (bench/gpu_check.py).
"""

__all__ = ["run_train", "train", "TrainingDiverged"]


def __getattr__(name: str):
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
