"""Merging deltas: one file per method, registered with declared options, run on the union of
the deltas' supports (sparse in, sparse out)."""

from surgical.merge import (  # noqa: F401  (register the methods)
    breadcrumbs,
    dare,
    della,
    fisher,
    karcher,
    linear,
    model_stock,
    sce,
    slerp,
    task_arithmetic,
    ties,
    wise_ft,
)
from surgical.merge.api import check_compatible, interference, interference_summary, merge
from surgical.merge.registry import MERGE_METHODS

__all__ = ["MERGE_METHODS", "check_compatible", "interference", "interference_summary", "merge"]
