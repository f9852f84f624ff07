"""Deltas: the on-disk result of training, applied to models, composed, compressed and exported.

This package never imports the training layer: a delta is made from a prepared model by
:func:`surgical.train.extract`, which stands above it.
"""

from surgical.delta.algebra import compose
from surgical.delta.delta import Delta
from surgical.delta.export import EXPORT_FORMATS
from surgical.delta.ops import applied, apply, revert

__all__ = ["EXPORT_FORMATS", "Delta", "applied", "apply", "compose", "revert"]
