"""Training only what was selected: sparse autograd, prepare/unprepare, HF Trainer glue."""

from surgical.train.prepare import prepare, prepared, sync, trainable_count, unprepare

__all__ = ["prepare", "prepared", "sync", "trainable_count", "unprepare"]
