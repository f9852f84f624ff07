"""Deltas: the on-disk result of training, applied to and extracted from models."""

from surgical.delta.delta import Delta
from surgical.delta.ops import apply, extract

__all__ = ["Delta", "apply", "extract"]
