"""Training only what was selected: the trainable-state protocol and its kinds (entries, blocks,
tied rows), prepare/extract, the fit loop with hooks, schedules, checkpoints and HF Trainer glue."""

from surgical.train.distributed import shard
from surgical.train.extract import extract
from surgical.train.hooks import StepState, TrainHook
from surgical.train.loop import FitResult, fit
from surgical.train.prepare import base_values, prepare, prepared, sync, trainable_count, unprepare
from surgical.train.quantize import QuantizeReport, quantize_base
from surgical.train.schedules import HFT, LISA, SCHEDULES, Regrow

__all__ = [
    "HFT",
    "LISA",
    "QuantizeReport",
    "SCHEDULES",
    "FitResult",
    "Regrow",
    "StepState",
    "SurgicalCallback",
    "TrainHook",
    "base_values",
    "extract",
    "fit",
    "prepare",
    "prepared",
    "quantize_base",
    "shard",
    "sync",
    "trainable_count",
    "unprepare",
]


def __getattr__(name: str):
    # transformers.Trainer and its callbacks are heavy imports (seconds): only on first use
    if name == "SurgicalTrainer":
        from surgical.train.trainer import SurgicalTrainer

        return SurgicalTrainer
    if name == "SurgicalCallback":
        from surgical.train.callback import SurgicalCallback

        return SurgicalCallback
    raise AttributeError(f"module 'surgical.train' has no attribute {name!r}")
