"""What a plan selected, per layer and tensor type: a table and a PNG heatmap.

Rows are transformer blocks (then each targeted tensor outside the blocks), columns are tensor
types (``q_proj``, ``attention.output.dense`` ...), and a cell is the share of that tensor's
parameters the plan trains. ``always`` parameters (dense, outside the budget) are not part of the
grid; the summary line counts them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from surgical.core.names import layer_index, split_layer
from surgical.core.plotting import colour_norm
from surgical.select.plan import Plan


@dataclass
class LayerReport:
    """The grid behind the table and the heatmap.

    Attributes:
        layers: Row labels (block numbers as strings, then names of tensors outside blocks).
        types: Column labels (short tensor types).
        share: ``share[i][j]`` = selected / total parameters of that cell, or None where the
            block has no targeted tensor of that type.
        layer_share: Per row, selected / targeted parameters.
        type_share: Per column, selected / targeted parameters.
    """

    layers: list[str]
    types: list[str]
    share: list[list[float | None]]
    layer_share: list[float]
    type_share: list[float]


def selected_count(plan: Plan, name: str) -> int:
    """Parameters of ``name`` that the plan trains (0 if it names it nowhere)."""
    shape = plan.shapes.get(name)
    if name in plan.dense:
        n = 1
        for s in shape:
            n *= s
        return n
    if name in plan.entries:
        return int(plan.entries[name].numel())
    if name in plan.rows:
        width = 1
        for s in shape[1:]:  # a row of an N-D weight (a conv channel, an expert) holds shape[1:]
            width *= s
        return int(plan.rows[name].numel()) * width
    if name in plan.cols:
        return int(plan.cols[name].numel()) * shape[0]
    return 0


def short_types(types: list[str]) -> dict[str, str]:
    """Each tensor type's shortest dotted suffix that is not also a suffix of another type."""
    out = {}
    for t in types:
        parts = t.split(".")
        for i in range(1, len(parts) + 1):
            suffix = ".".join(parts[-i:])
            if not any(o != t and (o == suffix or o.endswith("." + suffix)) for o in types):
                break
        out[t] = suffix
    return out


def layer_report(plan: Plan) -> LayerReport:
    """Builds the per-layer grid of a plan (targets from the plan's provenance when recorded)."""
    targets = plan.meta.get("targeted_shapes") or {n: list(s) for n, s in plan.shapes.items()}
    cells: dict[tuple[str, str], list[int]] = {}
    blocks: list[str] = []
    outside: list[str] = []
    types: list[str] = []
    for name, shape in targets.items():  # `always` parameters are never among the targets
        prefix, kind = split_layer(name)
        numel = 1
        for s in shape:
            numel *= s
        if prefix is None:
            row, kind = name, "(whole tensor)"
            outside.append(row)
        else:
            row = str(layer_index(prefix))
            if row not in blocks:
                blocks.append(row)
        if kind not in types:
            types.append(kind)
        sel = selected_count(plan, name) if name in plan.shapes else 0
        cell = cells.setdefault((row, kind), [0, 0])
        cell[0] += sel
        cell[1] += numel
    rows = sorted(blocks, key=int) + outside
    if "(whole tensor)" in types:  # tensors outside blocks go last
        types.remove("(whole tensor)")
        types.append("(whole tensor)")
    short = short_types([t for t in types if t != "(whole tensor)"])
    share = [[cells[(r, t)][0] / cells[(r, t)][1] if (r, t) in cells else None for t in types] for r in rows]

    def ratio(pairs: list[list[int]]) -> float:
        tot = sum(p[1] for p in pairs)
        return sum(p[0] for p in pairs) / tot if tot else 0.0

    layer_share = [ratio([v for (r, _), v in cells.items() if r == row]) for row in rows]
    type_share = [ratio([v for (_, t), v in cells.items() if t == typ]) for typ in types]
    return LayerReport(rows, [short.get(t, t) for t in types], share, layer_share, type_share)


def heatmap_png(report: LayerReport, title: str) -> bytes:
    """A layers x tensor types heatmap of selected shares, as PNG bytes (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    grid = np.array([[np.nan if v is None else 100 * v for v in r] for r in report.share], dtype=float)
    n_rows, n_cols = grid.shape
    fig, ax = plt.subplots(figsize=(2.5 + 1.1 * n_cols, max(3.5, 1.8 + 0.3 * n_rows)), dpi=120)
    norm, grid = colour_norm(grid)
    log = isinstance(norm, LogNorm)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd", under="#f4f1e8")  # grey: no tensor
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
    xs = zip(report.types, report.type_share, strict=True)
    ys = zip(report.layers, report.layer_share, strict=True)
    ax.set_xticks(range(n_cols), [f"{t}\n{100 * s:.2g}%" for t, s in xs])
    ax.set_yticks(range(n_rows), [f"{r}  ({100 * s:.2g}%)" for r, s in ys])
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("tensor type (% of the type selected)")
    ax.set_ylabel("layer (% of the layer selected)")
    if n_rows * n_cols <= 400:  # annotate readable grids; large ones rely on the colour bar
        for i in range(n_rows):
            for j in range(n_cols):
                if np.isfinite(grid[i, j]):
                    value = report.share[i][j] * 100
                    colour = "white" if 0 < value and norm(grid[i, j]) < 0.6 else "black"
                    ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7, color=colour)
    label = "% of the tensor selected" + (" (log scale; pale: none)" if log else "")
    fig.colorbar(im, ax=ax, label=label, fraction=0.05, pad=0.02)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plan_title(plan: Plan) -> str:
    """One line of provenance for the heatmap: criterion, granularity, allocation, budget."""
    m = plan.meta
    return (
        f"{m.get('method', '?')} · {m.get('granularity', 'entry')} · {m.get('allocation', 'global')} · "
        f"{m.get('selected', plan.num_entries):,} of {m.get('targeted', 0):,} targeted parameters"
    )


def always_names(plan: Plan) -> list[str]:
    """Parameters the plan trains densely outside the budget (the user's ``always`` list)."""
    targets = plan.meta.get("targeted_shapes")
    return [n for n in plan.dense if targets is not None and n not in targets]
