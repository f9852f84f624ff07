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
) -> None:
    """Apply deltas to a base model and write a plain Hugging Face model directory."""
    from surgical.delta import Delta, apply
    from surgical.hf import load_base_for, save_model_dir

    loaded = [Delta.load(d) for d in deltas]  # validate every delta before loading the model
    model, tokenizer = load_base_for(base, loaded[0])
    for d in loaded:
        apply(model, d, force=force)
    save_model_dir(model, tokenizer, out)
    console.print(f"wrote {out} ({len(loaded)} delta(s) applied to {base})")


@app.command()
def inspect(path: Annotated[str, typer.Argument(help="A delta directory.")]) -> None:
    """Summarise a delta: per-tensor counts, norms and the file size."""
    from surgical.delta import Delta
    from surgical.utils import dir_size

    delta = Delta.load(path)
    t = Table(title=f"delta {path}")
    for col in ("parameter", "kind", "count", "share", "L2 norm"):
        t.add_column(col, justify="left" if col in ("parameter", "kind") else "right")
    for name, (idx, vals) in delta.entries.items():
        numel = 1
        for s in delta.shapes[name]:
            numel *= s
        t.add_row(name, "entries", f"{idx.numel():,}", f"{idx.numel() / numel:.2%}", f"{vals.norm():.4g}")
    for name, tensor in delta.full.items():
        t.add_row(name, "full", f"{tensor.numel():,}", "100%", f"{tensor.norm():.4g}")
    console.print(t)
    size = dir_size(path)
    n = delta.num_entries
    base = delta.meta.get("base", {})
    console.print(
        f"{n:,} entries + {delta.num_full:,} full values; {size / 1024:.1f} KiB on disk"
        + (f" ({size / max(1, n + delta.num_full):.2f} bytes per value)")
        + f"; base {base.get('name_or_path', '?')} (fingerprint {base.get('fingerprint', '?')})"
    )
    if "training" in delta.meta:
        console.print(
            "training: " + json.dumps({k: v for k, v in delta.meta["training"].items() if k != "config"})
        )


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
    run_train(load_config(config, overrides), console)


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
