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

__version__ = "0.1.0"

from surgical.delta import Delta, applied, apply, compose, extract, revert  # noqa: E402
from surgical.errors import SurgicalError  # noqa: E402
from surgical.select import CRITERIA, Plan, select  # noqa: E402
from surgical.train import prepare, sync, trainable_count, unprepare  # noqa: E402
from surgical.train.hooks import SurgicalCallback  # noqa: E402
from surgical.train.loop import fit  # noqa: E402

__all__ = [
    "CRITERIA",
    "Delta",
    "Plan",
    "SurgicalCallback",
    "SurgicalError",
    "__version__",
    "applied",
    "apply",
    "compose",
    "extract",
    "fit",
    "prepare",
    "revert",
    "select",
    "sync",
    "trainable_count",
    "unprepare",
]
