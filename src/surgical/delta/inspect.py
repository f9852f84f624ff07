"""Looking at a delta: per-tensor counts and norms, and a picture of where it lives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from surgical.core.io import atomic_save_figure
from surgical.core.names import layer_index, split_layer
from surgical.core.plotting import colour_norm
from surgical.delta.delta import Delta


def tensor_rows(delta: Delta) -> list[dict[str, Any]]:
    """One row per tensor: name, kind, count of values, share of the tensor, L2 norm, max |value|.

    ``units`` is the number of rows or columns of a ``rows``/``cols`` block (None otherwise);
    ``count`` is always the number of values, so shares compare across kinds.
    """
    rows = []
    for name in delta.names():
        numel = 1
        for s in delta.shapes[name]:
            numel *= s
        kind = delta.kind_of(name)
        stored = getattr(delta, kind)[name]
        units = int(stored[0].numel()) if kind in ("rows", "cols") else None
        vals = stored if kind in ("dense", "full") else stored[1]
        v = vals.float().reshape(-1)
        rows.append(
            {
                "name": name,
                "kind": kind,
                "units": units,
                "count": int(v.numel()),
                "share": v.numel() / max(1, numel),
                "norm": float(v.norm()) if v.numel() else 0.0,
                "max_abs": float(v.abs().max()) if v.numel() else 0.0,
            }
        )
    return rows


def layer_grid(delta: Delta) -> tuple[list[int], list[str], torch.Tensor]:
    """(layer numbers, module names, share matrix) for tensors inside numbered layers.

    Entry ``[i, j]`` is the share of module ``j`` of layer ``i`` that the delta changes (NaN where
    it does not touch it).
    """
    cells: dict[tuple[int, str], float] = {}
    for row in tensor_rows(delta):
        prefix, module = split_layer(row["name"])
        if prefix is not None:
            cells[(layer_index(prefix), module)] = row["share"]
    layers = sorted({k[0] for k in cells})
    modules = sorted({k[1] for k in cells})
    grid = torch.full((len(layers), len(modules)), float("nan"))
    for (layer, module), share in cells.items():
        grid[layers.index(layer), modules.index(module)] = share
    return layers, modules, grid


def plot_delta(delta: Delta, path: str | Path, title: str = "where the delta lives") -> Path:
    """Writes a PNG heatmap of the changed share per layer and module (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, modules, grid = layer_grid(delta)
    path = Path(path)
    width = 3.0 + 0.75 * max(1, len(modules))
    fig, ax = plt.subplots(figsize=(max(5.0, width), 3.0 + 0.3 * max(1, len(layers))))
    if layers:
        from matplotlib.colors import LogNorm

        norm, shown = colour_norm((grid * 100).numpy())
        cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd", under="#f4f1e8")
        im = ax.imshow(shown, aspect="auto", cmap=cmap, norm=norm)
        ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=8)
        ax.set_ylabel("layer")
        log = " (log scale; pale: none)" if isinstance(norm, LogNorm) else ""
        fig.colorbar(im, ax=ax, label="% changed" + log)
    else:
        ax.text(0.5, 0.5, "no tensor inside numbered layers", ha="center", va="center")
        ax.set_axis_off()
    others = [r["name"] for r in tensor_rows(delta) if split_layer(r["name"])[0] is None]
    note = f"\n(+ {len(others)} tensor(s) outside numbered layers)" if others else ""
    ax.set_title(title + note, fontsize=9)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path)
    finally:
        plt.close(fig)
    return path
