"""Shared plotting helpers (matplotlib is imported only when a picture is drawn)."""

from __future__ import annotations


def colour_norm(grid):
    """The colour scale of a heatmap of percentages (NaN: no tensor), and the grid to draw.

    Shares often span decades (a pooler at 57%, layers at 0.01-5%), where a linear scale paints
    every layer the same colour; then the scale is logarithmic and unselected cells are moved
    below its minimum, so they take the colour map's "under" colour.
    """
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    positive = grid[np.isfinite(grid) & (grid > 0)]
    if positive.size > 1 and positive.max() / positive.min() > 30:
        low = float(positive.min())
        return LogNorm(vmin=low, vmax=float(positive.max())), np.where(grid == 0, low / 10, grid)
    vmax = max(1e-9, float(positive.max()) if positive.size else 1.0)
    return Normalize(vmin=0, vmax=vmax), grid
