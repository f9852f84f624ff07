"""Training only what was selected: sparse autograd, prepare/unprepare, the fit loop, schedules,
checkpoints and HF Trainer glue."""

from surgical.train.hooks import StepState, SurgicalCallback, TrainHook
from surgical.train.loop import FitResult, fit
from surgical.train.prepare import prepare, prepared, sync, trainable_count, unprepare
from surgical.train.schedules import HFT, LISA, Regrow

__all__ = [
    "HFT",
    "LISA",
    "FitResult",
    "Regrow",
    "StepState",
    "SurgicalCallback",
    "TrainHook",
    "fit",
    "prepare",
    "prepared",
    "sync",
    "trainable_count",
    "unprepare",
]
