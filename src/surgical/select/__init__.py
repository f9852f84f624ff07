"""Selection: score parameters with a registered criterion, then allocate a budget into a Plan."""

from surgical.select import (  # noqa: F401  (register the criteria)
    fim_layer,
    fisher,
    gradient,
    lottery,
    magnitude,
    principal,
    random,
    rgn,
    salience,
)
from surgical.select.api import select
from surgical.select.criteria import CRITERIA, ScoreContext
from surgical.select.plan import Plan

__all__ = ["CRITERIA", "Plan", "ScoreContext", "select"]
