"""Recipes over delta files: apply to a base, export, build from two checkpoints or a LoRA
adapter, and inspect. Each reads and writes files; the library functions they call do not."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from surgical.core.errors import SurgicalError
from surgical.core.io import check_output, check_png, check_replaceable, dir_size
from surgical.core.marks import forget_applied
from surgical.core.registry import check_range
from surgical.core.runtime import plain_console
from surgical.delta import EXPORT_FORMATS, Delta, apply
from surgical.delta.delta import CONFIG_FILE
from surgical.delta.inspect import plot_delta, tensor_rows
from surgical.recipes.models import load_base, save_model_dir


def _base_of(delta: Delta) -> tuple[str | None, int | None, str | None]:
    base = delta.meta.get("base", {})
    return base.get("architecture"), base.get("num_labels"), base.get("model_type")


def apply_deltas(
    base: str, deltas: Sequence[str], out: str, *, scales: Sequence[float] | None = None,
    force: bool = False, console: Console | None = None,
) -> Path:  # fmt: skip
    """Applies deltas (in order, each scaled) to a base model and writes a plain HF directory."""
    console = console or plain_console()
    check_output(out, {"base model": base, **{f"delta {d}": d for d in deltas}})
    check_replaceable(out, "config.json", "model")
    scales = list(scales) if scales else [1.0] * len(deltas)
    for a in scales:
        check_range(a, "--scale", low=-1e6, high=1e6)
    if len(scales) != len(deltas):
        raise SurgicalError(
            f"{len(deltas)} deltas but {len(scales)} --scale values", "Pass one --scale per delta"
        )
    loaded = [Delta.load(d) for d in deltas]  # validate every delta before loading the model
    seen: dict[str, int] = {}
    for i, d in enumerate(loaded, 1):
        first = seen.setdefault(d.digest(), i)
        if first != i:
            console.print(
                f"note: delta {i} ({deltas[i - 1]}) is the same as delta {first}: its change is added twice"
            )
    model, tokenizer = load_base(base, *_base_of(loaded[0]))
    with warnings.catch_warnings():  # said above, once, in the command's words
        warnings.simplefilter("ignore")
        for d, a in zip(loaded, scales, strict=True):
            apply(model, d, scale=a, force=force)
    forget_applied(model)  # the saved originals are not needed any more
    save_model_dir(model, tokenizer, out)
    console.print(f"wrote {out} ({len(loaded)} delta(s) applied to {base})")
    return Path(out)


def export_delta(delta_dir: str, base: str, out: str, *, to: str = "peft-shira", force: bool = False,
                 console: Console | None = None) -> Path:  # fmt: skip
    """Writes a delta in another library's format (see :data:`surgical.EXPORT_FORMATS`)."""
    console = console or plain_console()
    exporter = EXPORT_FORMATS.get(to)
    check_output(out, {"delta": delta_dir, "base model": base})
    check_replaceable(out, "adapter_config.json", "PEFT adapter")
    delta = Delta.load(delta_dir)
    model, _ = load_base(base, *_base_of(delta))
    exporter(delta, model, out, force=force)
    console.print(
        f"wrote {to} {out} ({dir_size(out) / 1024:.1f} KiB; ours {dir_size(delta_dir) / 1024:.1f} KiB)"
    )
    return Path(out)


def diff_models(base: str, finetuned: str, out: str, *, density: float | None = None, dtype: str = "float32",
                console: Console | None = None) -> Delta:  # fmt: skip
    """The delta between two checkpoints of one architecture, saved to ``out``."""
    console = console or plain_console()
    check_output(out, {"base model": base, "fine-tuned model": finetuned})
    check_replaceable(out, CONFIG_FILE, "delta")
    ft, _ = load_base(finetuned)
    ft_type = getattr(ft.config, "model_type", None)
    base_model, _ = load_base(base, type(ft).__name__, expect_type=ft_type, against="fine-tuned model")
    delta = Delta.from_models(base_model, ft, density=density)
    delta.save(out, dtype=dtype)
    console.print(
        f"wrote {out}: {delta.num_entries:,} entries, {delta.num_block_values:,} in rows/columns, "
        f"{delta.num_dense:,} dense, {delta.num_full:,} full values"
    )
    return delta


def import_lora(adapter: str, base: str, out: str, *, dtype: str = "float32",
                console: Console | None = None) -> Delta:  # fmt: skip
    """A PEFT LoRA adapter as a dense delta, with the base's fingerprint recorded."""
    console = console or plain_console()
    check_output(out, {"adapter": adapter, "base model": base})
    check_replaceable(out, CONFIG_FILE, "delta")
    model, _ = load_base(base)
    delta = Delta.from_peft_lora(adapter, base=model)
    delta.save(out, dtype=dtype)
    console.print(f"wrote {out}: {delta.num_dense:,} dense + {delta.num_full:,} full values from {adapter}")
    return delta


def inspect_delta(path: str, png: str | None, console: Console) -> Delta:
    """Prints a delta's per-tensor counts, share, norms and size on disk; optionally a PNG heatmap."""
    if png:
        check_png(png)
    delta = Delta.load(path)
    t = Table(title=f"delta {path}")
    for col in ("parameter", "kind", "count", "share", "L2 norm", "max |v|"):
        t.add_column(col, justify="left" if col in ("parameter", "kind") else "right")
    for r in tensor_rows(delta):
        t.add_row(
            r["name"],
            r["kind"] if r["units"] is None else f"{r['kind']} ({r['units']:,})",
            f"{r['count']:,}",
            f"{r['share']:.2%}",
            f"{r['norm']:.4g}",
            f"{r['max_abs']:.3g}",
        )
    console.print(t)
    size = dir_size(path)
    base = delta.meta.get("base", {})
    console.print(
        f"{delta.num_entries:,} entries + {delta.num_block_values:,} in rows/columns + "
        f"{delta.num_dense:,} dense + {delta.num_full:,} full values; {size / 1024:.1f} KiB "
        f"on disk ({size / max(1, delta.num_values):.2f} bytes per value)"
        + f"; base {base.get('name_or_path') or '?'} (fingerprint {base.get('fingerprint', '?')})",
        soft_wrap=True,  # one line, however narrow the terminal
    )
    if "training" in delta.meta:
        console.print(
            "training: " + json.dumps({k: v for k, v in delta.meta["training"].items() if k != "config"})
        )
    if png:
        plot_delta(delta, png, title=f"delta {path}")
        console.print(f"wrote {png}")
    return delta
