"""Deltas: the on-disk result of training, applied to and extracted from models."""

from surgical.delta.algebra import compose
from surgical.delta.delta import Delta
from surgical.delta.ops import applied, apply, extract, revert

__all__ = ["Delta", "applied", "apply", "compose", "extract", "revert"]
