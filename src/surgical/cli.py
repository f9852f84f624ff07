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
    density: Annotated[float, typer.Option(help="Fraction of the encoder's Linear weights to train.")] = 0.01,
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
    path: Annotated[str, typer.Argument(help="A delta directory.")],
    png: Annotated[
        str | None, typer.Option(help="Write a heatmap of where the delta lives to this PNG.")
    ] = None,
) -> None:
    """Summarise a delta: per-tensor counts, norms and the file size; optionally a PNG."""
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
            r["kind"],
            f"{r['count']:,}",
            f"{r['share']:.2%}",
            f"{r['norm']:.4g}",
            f"{r['max_abs']:.3g}",
        )
    console.print(t)
    size = dir_size(path)
    n = delta.num_entries
    base = delta.meta.get("base", {})
    console.print(
        f"{n:,} entries + {delta.num_dense:,} dense + {delta.num_full:,} full values; {size / 1024:.1f} KiB "
        f"on disk ({size / max(1, n + delta.num_dense + delta.num_full):.2f} bytes per value)"
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
        f"wrote {out}: {delta.num_entries:,} entries, {delta.num_dense:,} dense, "
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


def main() -> None:
    """Entry point: runs the app, turning SurgicalErrors into one line and exit status 2."""
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
