"""The ``surgical`` command. Each subcommand is thin: parse options -> config -> library call.

Bad input raises :class:`surgical.SurgicalError`; ``main`` prints its one-line message and exits
with status 2, without a traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from surgical.errors import SurgicalError

app = typer.Typer(
    name="surgical",
    help="Selective fine-tuning: train only the parts of a model that matter, keep a tiny exact delta.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@app.command()
def demo(
    quick: Annotated[
        bool, typer.Option("--quick", help="Small subsets; runs in well under a minute.")
    ] = False,
    out: Annotated[str, typer.Option(help="Directory for the delta.")] = "surgical-demo-delta",
    model: Annotated[
        str | None, typer.Option(help="Model directory (default: packaged all-MiniLM-L6-v2).")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="CSV with text,label,source (default: packaged movie reviews).")
    ] = None,
    method: Annotated[str, typer.Option(help="Selection criterion.")] = "gradient",
    density: Annotated[
        float, typer.Option(help="Fraction of the encoder layers' Linear weights trained as sparse entries.")
    ] = 0.004,
    targets: Annotated[
        list[str] | None, typer.Option("--target", help="Pattern of weights to select from (repeatable).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for selection, shuffling and the new head.")] = 0,
) -> None:
    """Fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes with 1% of its weights; report ID/OOD accuracy."""
    from surgical.demo import DemoConfig, run_demo

    overrides = dict(out=out, model=model, data=data, method=method, density=density, seed=seed)
    if targets:
        overrides["targets"] = tuple(targets)
    if lr is not None:
        overrides["lr"] = lr
    if epochs is not None:
        overrides["epochs"] = epochs
    cfg = DemoConfig.quick(**overrides) if quick else DemoConfig(**overrides)
    run_demo(cfg, console)


@app.command("apply")
def apply_cmd(
    base: Annotated[str, typer.Argument(help="Base model directory.")],
    deltas: Annotated[list[str], typer.Argument(help="One or more delta directories, applied in order.")],
    out: Annotated[str, typer.Option(help="Directory for the merged Hugging Face model.")],
    force: Annotated[bool, typer.Option(help="Apply even if the base fingerprint differs.")] = False,
    scale: Annotated[
        list[float] | None,
        typer.Option("--scale", help="Weight of each delta (repeat once per delta; default 1)."),
    ] = None,
) -> None:
    """Apply deltas to a base model and write a plain Hugging Face model directory."""
    from surgical.delta import Delta, apply
    from surgical.hf import load_base_for, save_model_dir

    scales = list(scale) if scale else [1.0] * len(deltas)
    if len(scales) != len(deltas):
        raise SurgicalError(
            f"{len(deltas)} deltas but {len(scales)} --scale values", "Pass one --scale per delta"
        )
    loaded = [Delta.load(d) for d in deltas]  # validate every delta before loading the model
    model, tokenizer = load_base_for(base, loaded[0])
    for d, a in zip(loaded, scales, strict=True):
        apply(model, d, scale=a, force=force)
    model.__dict__.pop("_sg_applied", None)  # the saved originals are not needed any more
    save_model_dir(model, tokenizer, out)
    console.print(f"wrote {out} ({len(loaded)} delta(s) applied to {base})")


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="A delta directory, or a plan directory (with plan.json).")],
    png: Annotated[
        str | None, typer.Option(help="Write a heatmap to this PNG (a plan's default: PLAN/selection.png).")
    ] = None,
) -> None:
    """Summarise a delta (per-tensor counts, norms, size) or a plan (per-layer table and heatmap)."""
    from pathlib import Path

    if (Path(path) / "plan.json").is_file():
        _inspect_plan(path, png)
    else:
        _inspect_delta(path, png)


def _inspect_delta(path: str, png: str | None) -> None:
    """Prints a delta's per-tensor counts, share, norms and size on disk; optionally a PNG heatmap."""
    from surgical.delta import Delta
    from surgical.delta.inspect import plot_delta, tensor_rows
    from surgical.utils import dir_size

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


@app.command()
def export(
    delta_dir: Annotated[str, typer.Argument(help="A delta directory.")],
    base: Annotated[str, typer.Option(help="Base model directory the delta was trained on.")],
    out: Annotated[str, typer.Option(help="Directory for the exported adapter.")],
    to: Annotated[str, typer.Option("--to", help="Target format: peft-shira.")] = "peft-shira",
    force: Annotated[bool, typer.Option(help="Export even if the base fingerprint differs.")] = False,
) -> None:
    """Export a delta to another library's format (a PEFT SHiRA adapter)."""
    from surgical.delta import Delta
    from surgical.delta.peft_export import export_shira
    from surgical.hf import load_base_for
    from surgical.utils import dir_size

    if to != "peft-shira":
        raise SurgicalError(f"unknown export format {to!r}", "Use --to peft-shira")
    delta = Delta.load(delta_dir)
    model, _ = load_base_for(base, delta)
    export_shira(delta, model, out, force=force)
    console.print(
        f"wrote PEFT SHiRA adapter {out} ({dir_size(out) / 1024:.1f} KiB; "
        f"ours {dir_size(delta_dir) / 1024:.1f} KiB)"
    )


@app.command()
def diff(
    base: Annotated[str, typer.Argument(help="Base model directory.")],
    finetuned: Annotated[str, typer.Argument(help="Fine-tuned model directory (same architecture).")],
    out: Annotated[str, typer.Option(help="Directory for the delta.")],
    density: Annotated[
        float | None,
        typer.Option(help="Keep this share of each tensor's largest changes (default: all, dense)."),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="Value storage: float32, float16, bfloat16, int8, sign.")
    ] = "float32",
) -> None:
    """Build a delta from two checkpoints (a model fine-tuned anywhere)."""
    from surgical.delta import Delta
    from surgical.hf import load_base_for

    ft_probe = Delta(meta={"base": {"architecture": _architecture_of(finetuned)}})
    ft, _ = load_base_for(finetuned, ft_probe)
    base_model, _ = load_base_for(base, Delta(meta={"base": {"architecture": type(ft).__name__}}))
    delta = Delta.from_models(base_model, ft, density=density)
    delta.save(out, dtype=dtype)
    console.print(
        f"wrote {out}: {delta.num_entries:,} entries, {delta.num_block_values:,} in rows/columns, "
        f"{delta.num_dense:,} dense, "
        f"{delta.num_full:,} full values"
    )


@app.command("import-lora")
def import_lora(
    adapter: Annotated[str, typer.Argument(help="PEFT LoRA adapter directory (safetensors).")],
    base: Annotated[str, typer.Option(help="Base model directory, to record its fingerprint.")],
    out: Annotated[str, typer.Option(help="Directory for the delta.")],
    dtype: Annotated[str, typer.Option(help="Value storage: float32, float16, bfloat16.")] = "float32",
) -> None:
    """Import a PEFT LoRA adapter as a dense delta."""
    from surgical.delta import Delta
    from surgical.hf import load_base_for

    probe = Delta(meta={"base": {"architecture": _architecture_of(base)}})
    model, _ = load_base_for(base, probe)
    delta = Delta.from_peft_lora(adapter, base=model)
    delta.save(out, dtype=dtype)
    console.print(f"wrote {out}: {delta.num_dense:,} dense + {delta.num_full:,} full values from {adapter}")


def _architecture_of(model_dir: str) -> str:
    """The first architecture named in a model directory's config.json (AutoModel if none)."""
    from pathlib import Path

    try:
        archs = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        archs = []
    return archs[0] if archs else "AutoModel"


@app.command()
def train(
    config: Annotated[str | None, typer.Option("--config", "-c", help="YAML run config.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set training.lr=3e-4 (repeatable)."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Override model.path.")] = None,
    data: Annotated[str | None, typer.Option(help="Override data.path.")] = None,
    out: Annotated[str | None, typer.Option(help="Override out (the run directory).")] = None,
    density: Annotated[float | None, typer.Option(help="Override selection.density.")] = None,
    lr: Annotated[float | None, typer.Option(help="Override training.lr.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Override training.max_steps.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint.")] = False,
    allow_change: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-change",
            help="With --resume: accept a changed training.lr, training.max_grad_norm, "
            "training.max_steps or training.epochs (repeatable).",
        ),
    ] = None,
    keys: Annotated[
        bool, typer.Option("--keys", help="List every config key with its help, then exit.")
    ] = False,
) -> None:
    """Train a selection of a model from a YAML config; write the delta and a run summary."""
    from surgical.train.config import help_text, load_config, parse_override
    from surgical.train.run import run_train

    if keys:
        for line in help_text():
            console.print(line, highlight=False)
        return
    overrides = dict(parse_override(s) for s in set_ or [])
    flags = {
        "model.path": model,
        "data.path": data,
        "out": out,
        "selection.density": density,
        "training.lr": lr,
        "training.max_steps": max_steps,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if resume:
        overrides["training.resume"] = True
    if allow_change and not resume:
        raise SurgicalError("--allow-change only applies to a resumed run", "Add --resume")
    run_train(load_config(config, overrides), console, allow_changes=allow_change or ())


def _parse_options(items: list[str] | None) -> dict:
    """``key=value`` pairs; values are JSON when they parse (numbers, true/false), else strings."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SurgicalError(f"option {item!r} is not key=value", "Pass e.g. --option labels=sampled")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@app.command("select")
def select_cmd(
    model: Annotated[str, typer.Argument(help="Model directory (Hugging Face, local).")],
    data: Annotated[
        str,
        typer.Option(
            help="Calibration data with a text column: .csv, .jsonl, .parquet, .arrow or a save_to_disk dir."
        ),
    ],
    out: Annotated[str, typer.Option(help="Directory for the plan.")] = "surgical-plan",
    method: Annotated[str, typer.Option(help="Criterion (gradient, fisher, lottery ...).")] = "gradient",
    density: Annotated[float | None, typer.Option(help="Fraction of the targeted parameters.")] = None,
    count: Annotated[int | None, typer.Option(help="Number of parameters instead of a density.")] = None,
    optimizer_bytes: Annotated[
        int | None, typer.Option(help="AdamW fp32 state budget in bytes (16 per parameter).")
    ] = None,
    granularity: Annotated[
        str | None, typer.Option(help="entry, row, column, head, tensor or layer (default: the criterion's).")
    ] = None,
    allocation: Annotated[str, typer.Option(help="global, per_tensor or per_layer.")] = "global",
    aggregate: Annotated[str, typer.Option(help="A unit's score: sum or mean of its entries.")] = "sum",
    targets: Annotated[
        list[str] | None, typer.Option("--target", help="Pattern to select from (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Pattern removed from the targets (repeatable).")
    ] = None,
    always: Annotated[
        list[str] | None, typer.Option(help="Pattern trained densely, outside the budget (repeatable).")
    ] = None,
    option: Annotated[
        list[str] | None, typer.Option(help="Criterion option key=value, e.g. labels=sampled (repeatable).")
    ] = None,
    task: Annotated[str, typer.Option(help="auto, classification or causal-lm.")] = "auto",
    text_column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    label_column: Annotated[str, typer.Option(help="Integer label column (classification).")] = "label",
    split: Annotated[str, typer.Option(help="Split of a DatasetDict directory.")] = "train",
    batches: Annotated[int, typer.Option(help="Calibration batches.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Examples per calibration batch.")] = 16,
    max_length: Annotated[int, typer.Option(help="Tokens per example.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed for sampling data, random scores and a new head.")] = 0,
    png: Annotated[str | None, typer.Option(help="Heatmap path (default: OUT/selection.png).")] = None,
) -> None:
    """Score a model on calibration data and write a Plan directory, with a per-layer summary."""
    from pathlib import Path

    from surgical.select import select
    from surgical.select.calibration import load_for_selection

    out_path = Path(out)
    if out_path.exists() and not (out_path / "plan.json").is_file():
        raise SurgicalError(f"output {out!r} exists and is not a plan directory", "Choose another --out")
    options = _parse_options(option)
    loaded, calib, task = load_for_selection(
        model,
        data,
        task=task,
        split=split,
        text_column=text_column,
        label_column=label_column,
        batches=batches,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
    )
    plan = select(
        loaded,
        calib,
        method=method,
        density=density,
        count=count,
        optimizer_bytes=optimizer_bytes,
        granularity=granularity,
        allocation=allocation,
        aggregate=aggregate,
        targets=targets,
        exclude=exclude,
        always=always,
        max_batches=batches,
        seed=seed,
        **options,
    )
    plan.meta["model"] = str(model)
    plan.meta["data"] = str(data)
    plan.meta["task"] = task
    plan.save(out_path)
    console.print(f"wrote plan {out}: {plan.summary()}")
    _inspect_plan(out, png)


def _inspect_plan(path: str, png: str | None) -> None:
    """Prints a plan's per-layer table and writes its heatmap PNG."""
    from pathlib import Path

    from surgical.select.plan import Plan
    from surgical.select.report import always_names, heatmap_png, layer_report, plan_title
    from surgical.utils import atomic_write_bytes

    plan = Plan.load(path)
    report = layer_report(plan)
    t = Table(title=f"plan {path}: share of each layer and tensor type selected")
    t.add_column("layer")
    for typ in report.types:
        t.add_column(typ, justify="right")
    t.add_column("layer total", justify="right")
    for row, shares, total in zip(report.layers, report.share, report.layer_share, strict=True):
        cells = ["" if v is None else f"{v:.2%}" for v in shares]
        t.add_row(row, *cells, f"{total:.2%}")
    t.add_row("all", *[f"{v:.2%}" for v in report.type_share], "", style="bold")
    console.print(t)
    m = plan.meta
    extra = always_names(plan)
    always_count = sum(_numel(plan.shapes[n]) for n in extra)
    console.print(
        f"{m.get('method', '?')}, granularity {m.get('granularity', 'entry')}, allocation "
        f"{m.get('allocation', 'global')}: {m.get('selected', plan.num_entries):,} of "
        f"{m.get('targeted', 0):,} targeted parameters (budget {m.get('budget', 0):,}), "
        f"{m.get('calibration_batches', 0)} calibration batches"
        + (f"; always dense: {always_count:,} in {len(extra)} tensors" if extra else "")
    )
    target = Path(png) if png else Path(path) / "selection.png"
    atomic_write_bytes(target, heatmap_png(report, plan_title(plan)))
    console.print(f"heatmap: {target}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main() -> None:
    """Entry point: runs the app, turning SurgicalErrors into one line and exit status 2."""
    global console, err_console
    console, err_console = Console(), Console(stderr=True)  # sized for the terminal of this run
    try:
        app(standalone_mode=False)
    except SurgicalError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        sys.exit(code)
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise
