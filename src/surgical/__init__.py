"""surgical: selective fine-tuning of PyTorch / Hugging Face models.

Select what to train under a budget, train only that at the memory floor, keep the result as a
small exact delta::

    import surgical as sg
    plan = sg.select(model, batches, method="gradient", density=0.01, always=["classifier"])
    sg.prepare(model, plan)
    ...  # train with your own loop or the HF Trainer
    delta = sg.extract(model)
    delta.save("my-delta")
    sg.apply(base_model, sg.Delta.load("my-delta"))
"""

from surgical.core.errors import SurgicalError
from surgical.core.version import __version__
from surgical.data import (
    DATA_CRITERIA,
    TOKEN_CRITERIA,
    DataSelection,
    OnlineSelector,
    select_data,
    token_mask,
)
from surgical.delta import EXPORT_FORMATS, Delta, applied, apply, compose, revert
from surgical.eval import evaluate, forgetting
from surgical.merge import MERGE_METHODS, interference, interference_summary, merge
from surgical.select import CRITERIA, Plan, select
from surgical.train import (
    SCHEDULES,
    base_values,
    extract,
    fit,
    prepare,
    quantize_base,
    sync,
    trainable_count,
    unprepare,
)

__all__ = [
    "CRITERIA",
    "DATA_CRITERIA",
    "EXPORT_FORMATS",
    "MERGE_METHODS",
    "SCHEDULES",
    "DataSelection",
    "Delta",
    "OnlineSelector",
    "Plan",
    "SurgicalCallback",
    "SurgicalError",
    "SurgicalTrainer",
    "TOKEN_CRITERIA",
    "__version__",
    "applied",
    "base_values",
    "apply",
    "compose",
    "evaluate",
    "extract",
    "fit",
    "forgetting",
    "interference",
    "interference_summary",
    "merge",
    "prepare",
    "quantize_base",
    "revert",
    "select",
    "select_data",
    "sync",
    "token_mask",
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
    raise AttributeError(f"module 'surgical' has no attribute {name!r}")
