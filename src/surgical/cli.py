"""The ``surgical`` command. Each subcommand parses its options into a recipe config and calls
one recipe (:mod:`surgical.recipes`); nothing else happens here.

Bad input raises :class:`surgical.SurgicalError`; ``main`` prints its one-line message and exits
with status 2, without a traceback. Usage errors (a missing or unknown option, a bad number)
exit 2 with click's usage line; an interrupt exits 130.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.text import Text

from surgical.core.errors import SurgicalError
from surgical.core.runtime import plain_console

app = typer.Typer(
    name="surgical",
    help="Selective fine-tuning: train only the parts of a model that matter, keep a tiny exact delta.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = plain_console()
err_console = plain_console(stderr=True)


def _set(items: list[str] | None) -> dict[str, Any]:
    from surgical.recipes.config import parse_override

    return dict(parse_override(s) for s in items or [])


def _options(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values are JSON when they parse (numbers, true/false), else strings."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SurgicalError(f"option {item!r} is not key=value", "Pass e.g. --option labels=sampled")
        if key in out:
            raise SurgicalError(f"option {key!r} is given twice", "Pass each option once")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _flags(pairs: dict[str, Any]) -> dict[str, Any]:
    """Flag values that were given (None and empty lists mean "not given")."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in pairs.items() if v not in (None, [])}


def _print_keys(cls: type) -> None:
    from surgical.recipes.config import help_text

    for line in help_text(cls):
        console.print(line, highlight=False, soft_wrap=True)


def _registries() -> dict:
    from surgical.data import DATA_CRITERIA, TOKEN_CRITERIA
    from surgical.delta import EXPORT_FORMATS
    from surgical.merge import MERGE_METHODS
    from surgical.select import CRITERIA
    from surgical.train import SCHEDULES

    return {
        "criteria": CRITERIA,
        "schedules": SCHEDULES,
        "merge-methods": MERGE_METHODS,
        "data-criteria": DATA_CRITERIA,
        "token-criteria": TOKEN_CRITERIA,
        "export-formats": EXPORT_FORMATS,
    }


def _print_registries(which: tuple[str, ...]) -> None:
    registries = _registries()
    for name in which:
        kind = registries[name].kind
        console.print(f"[bold]{name}[/] ({kind}, options under their section's `options:`)", markup=True)
        for line in registries[name].describe():
            console.print("  " + line, highlight=False, soft_wrap=True)


@app.command("list")
def list_cmd(
    what: Annotated[
        str | None,
        typer.Argument(
            help="criteria, schedules, merge-methods, data-criteria, token-criteria or export-formats "
            "(default: all)."
        ),
    ] = None,
) -> None:
    """List what can be chosen by name (criteria, schedules, merge methods, ...), with their options."""
    names = tuple(_registries())
    if what is not None and what not in names:
        raise SurgicalError(f"unknown list {what!r}", f"Use one of: {', '.join(names)}")
    _print_registries((what,) if what else names)


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
    method: Annotated[
        str | None, typer.Option(help="Selection criterion (default: the recipe's, lottery).")
    ] = None,
    density: Annotated[
        float | None,
        typer.Option(
            help="Fraction of the encoder layers' Linear weights trained as entries (default 0.01)."
        ),
    ] = None,
    targets: Annotated[
        list[str] | None, typer.Option("--target", help="Pattern of weights to select from (repeatable).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for selection, shuffling and the new head.")] = 0,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="Also train full fine-tuning and PEFT LoRA on the same split and seed (3x the time); "
            "without it, the baselines recorded for the default settings are shown, with their date.",
        ),
    ] = False,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Also write the measurements to this JSON file.")
    ] = None,
) -> None:
    """Fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes with 1% of its weights; report ID/OOD accuracy."""
    from surgical.recipes.demo import DemoConfig, run_demo

    overrides = dict(out=out, model=model, data=data, seed=seed, compare=compare)
    overrides.update(
        _flags({"method": method, "density": density, "targets": targets, "lr": lr, "epochs": epochs})
    )
    cfg = DemoConfig.quick(**overrides) if quick else DemoConfig(**overrides)
    result = run_demo(cfg, console)
    if json_out:
        import datetime
        import platform

        import torch

        from surgical.core.io import atomic_write_text
        from surgical.core.version import __version__

        record = {
            "benchmark": "demo",
            "command": " ".join(["surgical", *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "platform": platform.platform(),
                "torch": torch.__version__,
                "surgical": __version__,
                "threads": torch.get_num_threads(),
            },
            "result": result,
        }
        atomic_write_text(json_out, json.dumps(record, indent=2, default=str))


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
    method: Annotated[str | None, typer.Option(help="Override selection.method.")] = None,
    density: Annotated[float | None, typer.Option(help="Override selection.density.")] = None,
    granularity: Annotated[str | None, typer.Option(help="Override selection.granularity.")] = None,
    option: Annotated[
        list[str] | None, typer.Option(help="Criterion option key=value (selection.options; repeatable).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Override training.lr.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Override training.max_steps.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint.")] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace the files of an earlier run in the run directory, once this run's input "
            "is checked.",
        ),
    ] = False,
    allow_change: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-change",
            help="With --resume: accept a changed training.lr, training.max_grad_norm, "
            "training.max_steps or training.epochs (repeatable).",
        ),
    ] = None,
    keys: Annotated[
        bool,
        typer.Option("--keys", help="List every config key and each criterion's and schedule's options."),
    ] = False,
) -> None:
    """Train a selection of a model from a YAML config; write the delta and a run summary."""
    from surgical.recipes.config import load_config
    from surgical.recipes.train import RunConfig, run_train

    if keys:
        _print_keys(RunConfig)
        _print_registries(("criteria", "schedules"))
        return
    overrides = _set(set_)
    overrides.update(
        _flags({
            "model.path": model, "data.path": data, "out": out, "selection.method": method,
            "selection.density": density, "selection.granularity": granularity,
            "training.lr": lr, "training.max_steps": max_steps,
        })
    )  # fmt: skip
    for key, value in _options(option).items():
        overrides[f"selection.options.{key}"] = value
    if resume:
        overrides["training.resume"] = True
    if allow_change and not resume:
        raise SurgicalError("--allow-change only applies to a resumed run", "Add --resume")
    if overwrite and resume:
        raise SurgicalError("--overwrite and --resume contradict each other", "Pass one of them")
    run_train(load_config(RunConfig, config, overrides), console, allow_changes=allow_change or (),
              overwrite=overwrite)  # fmt: skip


@app.command("select")
def select_cmd(
    model: Annotated[str | None, typer.Argument(help="Model directory (Hugging Face, local).")] = None,
    config: Annotated[str | None, typer.Option("--config", "-c", help="YAML select config.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set selection.density=0.01 (repeatable)."),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Calibration data: .csv, .jsonl, .parquet, .arrow or a save_to_disk dir."),
    ] = None,
    out: Annotated[str | None, typer.Option(help="Directory for the plan.")] = None,
    method: Annotated[str | None, typer.Option(help="Criterion (`surgical list criteria`).")] = None,
    density: Annotated[float | None, typer.Option(help="Fraction of the targeted parameters.")] = None,
    count: Annotated[int | None, typer.Option(help="Number of parameters instead of a density.")] = None,
    optimizer_bytes: Annotated[
        int | None, typer.Option(help="AdamW fp32 state budget in bytes (16 per parameter).")
    ] = None,
    granularity: Annotated[
        str | None,
        typer.Option(
            help="entry, row, column, head, channel, expert, tensor or layer (default: the criterion's)."
        ),
    ] = None,
    allocation: Annotated[str | None, typer.Option(help="global, per_tensor or per_layer.")] = None,
    aggregate: Annotated[str | None, typer.Option(help="A unit's score: sum or mean of its entries.")] = None,
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
    task: Annotated[str | None, typer.Option(help="auto, classification or causal_lm.")] = None,
    text_column: Annotated[str | None, typer.Option(help="Column holding the text.")] = None,
    label_column: Annotated[str | None, typer.Option(help="Integer label column (classification).")] = None,
    split: Annotated[str | None, typer.Option(help="Split of a DatasetDict directory.")] = None,
    max_batches: Annotated[int | None, typer.Option(help="Calibration batches.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per calibration batch.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per example.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for sampling data, random scores and a new head.")
    ] = None,
    png: Annotated[str | None, typer.Option(help="Heatmap path (default: OUT/selection.png).")] = None,
    keys: Annotated[bool, typer.Option("--keys", help="List every config key and criterion option.")] = False,
) -> None:
    """Score a model on calibration data and write a Plan directory, with a per-layer summary."""
    from surgical.recipes.config import load_config
    from surgical.recipes.select import SelectConfig, run_select

    if keys:
        _print_keys(SelectConfig)
        _print_registries(("criteria",))
        return
    overrides = _set(set_)
    overrides.update(
        _flags({
            "model.path": model, "model.task": task, "data.path": data, "data.text_column": text_column,
            "data.label_column": label_column, "data.split": split, "data.batch_size": batch_size,
            "data.max_length": max_length, "out": out, "png": png, "seed": seed,
            "selection.method": method, "selection.density": density, "selection.count": count,
            "selection.optimizer_bytes": optimizer_bytes, "selection.granularity": granularity,
            "selection.allocation": allocation, "selection.aggregate": aggregate,
            "selection.targets": targets, "selection.exclude": exclude, "selection.always": always,
            "selection.max_batches": max_batches,
        })
    )  # fmt: skip
    for key, value in _options(option).items():
        overrides[f"selection.options.{key}"] = value
    run_select(load_config(SelectConfig, config, overrides), console)


def _named(items: list[str] | None, flag: str) -> dict[str, str]:
    """``NAME=PATH`` pairs (repeatable flags such as ``--data id=test.csv``)."""
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SurgicalError(f"{flag} {item!r} is not NAME=PATH", f"Pass e.g. {flag} id=test.csv")
        if name in out:
            raise SurgicalError(
                f"{flag} names the set {name!r} twice ({out[name]} and {path})", "Give each set its own name"
            )
        out[name] = path
    return out


@app.command("eval")
def eval_cmd(
    model: Annotated[
        str | None, typer.Argument(help="Model directory (the base, when --delta is given).")
    ] = None,
    config: Annotated[str | None, typer.Option("--config", "-c", help="YAML eval config.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key (repeatable).")
    ] = None,
    data: Annotated[
        list[str] | None, typer.Option("--data", help="A named set NAME=PATH, e.g. id=test.csv (repeatable).")
    ] = None,
    delta: Annotated[
        str | None, typer.Option(help="A delta applied to the model (toggled in place).")
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(help="Reference data for forgetting (loss change, KL to the base); needs --delta."),
    ] = None,
    out: Annotated[str | None, typer.Option(help="Report directory.")] = None,
    task: Annotated[str | None, typer.Option(help="auto, classification or causal_lm.")] = None,
    keys: Annotated[bool, typer.Option("--keys", help="List every config key.")] = False,
) -> None:
    """Evaluate a model (plus a delta) on named sets; forgetting against its base; JSON + PNG report."""
    from surgical.recipes.config import load_config
    from surgical.recipes.evaluate import EvalConfig, run_evaluate

    if keys:
        _print_keys(EvalConfig)
        return
    overrides = _set(set_)
    overrides.update(_flags({"model.path": model, "model.task": task, "delta": delta, "reference": reference,
                             "out": out}))  # fmt: skip
    for name, path in _named(data, "--data").items():
        overrides[f"sets.{name}"] = path
    run_evaluate(load_config(EvalConfig, config, overrides), console)


@app.command("merge")
def merge_cmd(
    config: Annotated[
        str | None, typer.Argument(help="YAML merge config (method, options, inputs, out).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key (repeatable).")
    ] = None,
    method: Annotated[str | None, typer.Option(help="Merge method (`surgical list merge-methods`).")] = None,
    delta: Annotated[list[str] | None, typer.Option("--delta", help="An input delta (repeatable).")] = None,
    weight: Annotated[list[float] | None, typer.Option("--weight", help="Weight of each --delta.")] = None,
    option: Annotated[list[str] | None, typer.Option(help="Method option key=value (repeatable).")] = None,
    base: Annotated[str | None, typer.Option(help="Base model (model/lora inputs, a model output).")] = None,
    out: Annotated[str | None, typer.Option(help="Output directory.")] = None,
    check: Annotated[
        bool,
        typer.Option("--check", help="Report overlap, sign conflicts and cosine per tensor; merge nothing."),
    ] = False,
    keys: Annotated[bool, typer.Option("--keys", help="List every config key and merge method.")] = False,
) -> None:
    """Merge deltas (or fine-tuned checkpoints, LoRA adapters) by TIES, DARE, Model Stock, WiSE-FT..."""
    from surgical.recipes.config import load_config
    from surgical.recipes.merge import MergeConfig, run_merge

    if keys:
        _print_keys(MergeConfig)
        _print_registries(("merge-methods",))
        return
    overrides = _set(set_)
    overrides.update(_flags({"method": method, "base": base, "out": out}))
    if delta:
        weights = list(weight) if weight else [1.0] * len(delta)
        if len(weights) != len(delta):
            raise SurgicalError(
                f"{len(delta)} --delta but {len(weights)} --weight", "Pass one --weight per --delta"
            )
        overrides["inputs"] = [{"delta": d, "weight": w} for d, w in zip(delta, weights, strict=True)]
    for key, value in _options(option).items():
        overrides[f"options.{key}"] = value
    run_merge(load_config(MergeConfig, config, overrides), console, check_only=check)


@app.command("wise-ft")
def wise_ft_cmd(
    config: Annotated[str | None, typer.Option("--config", "-c", help="YAML sweep config.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key (repeatable).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Base model directory.")] = None,
    delta: Annotated[str | None, typer.Option(help="The fine-tuned delta.")] = None,
    validation: Annotated[str | None, typer.Option(help="Validation data: alpha is chosen on it.")] = None,
    data: Annotated[
        list[str] | None, typer.Option("--data", help="A test set NAME=PATH, reported only (repeatable).")
    ] = None,
    alpha: Annotated[
        list[float] | None, typer.Option("--alpha", help="A grid point in [0, 1] (repeatable).")
    ] = None,
    reference: Annotated[
        str | None, typer.Option(help="Data not to forget: KL to the base and loss change at every alpha.")
    ] = None,
    max_kl: Annotated[
        float | None,
        typer.Option(
            "--max-kl", help="Choose only alphas with KL(base || tuned) on --reference at most this."
        ),
    ] = None,
    out: Annotated[str | None, typer.Option(help="Report directory.")] = None,
    keys: Annotated[bool, typer.Option("--keys", help="List every config key.")] = False,
) -> None:
    """WiSE-FT: sweep base + alpha x delta, choose alpha on validation; ID vs OOD and KL plots.

    With --reference (and --max-kl), alpha is chosen within a forgetting budget on that data."""
    from surgical.recipes.config import load_config
    from surgical.recipes.searches import WiseFTConfig, run_wise_ft

    if keys:
        _print_keys(WiseFTConfig)
        return
    overrides = _set(set_)
    overrides.update(_flags({"model.path": model, "delta": delta, "search.validation": validation, "out": out,
                             "alphas": alpha, "reference": reference, "max_kl": max_kl}))  # fmt: skip
    for name, path in _named(data, "--data").items():
        overrides[f"search.sets.{name}"] = path
    run_wise_ft(load_config(WiseFTConfig, config, overrides), console)


@app.command("soup")
def soup_cmd(
    candidates: Annotated[list[str] | None, typer.Argument(help="Candidate delta directories.")] = None,
    config: Annotated[str | None, typer.Option("--config", "-c", help="YAML soup config.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key (repeatable).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Base model directory.")] = None,
    validation: Annotated[
        str | None, typer.Option(help="Validation data: the greedy soup is built on it.")
    ] = None,
    data: Annotated[
        list[str] | None, typer.Option("--data", help="A test set NAME=PATH, reported only (repeatable).")
    ] = None,
    out: Annotated[str | None, typer.Option(help="Report directory.")] = None,
    keys: Annotated[bool, typer.Option("--keys", help="List every config key.")] = False,
) -> None:
    """Greedy and uniform model soups of candidate deltas, chosen on validation."""
    from surgical.recipes.config import load_config
    from surgical.recipes.searches import SoupConfig, run_soup

    if keys:
        _print_keys(SoupConfig)
        return
    overrides = _set(set_)
    overrides.update(_flags({"model.path": model, "search.validation": validation, "out": out,
                             "candidates": candidates}))  # fmt: skip
    for name, path in _named(data, "--data").items():
        overrides[f"search.sets.{name}"] = path
    run_soup(load_config(SoupConfig, config, overrides), console)


@app.command("select-data")
def select_data_cmd(
    model: Annotated[str | None, typer.Argument(help="Model directory (Hugging Face, local).")] = None,
    config: Annotated[str | None, typer.Option("--config", "-c", help="YAML config.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key (repeatable).")
    ] = None,
    data: Annotated[str | None, typer.Option(help="The examples to choose from.")] = None,
    out: Annotated[str | None, typer.Option(help="Directory for the selection manifest.")] = None,
    method: Annotated[
        str | None, typer.Option(help="Data criterion (`surgical list data-criteria`).")
    ] = None,
    fraction: Annotated[float | None, typer.Option(help="Share of the examples to keep.")] = None,
    count: Annotated[int | None, typer.Option(help="Number of examples to keep instead.")] = None,
    option: Annotated[list[str] | None, typer.Option(help="Criterion option key=value (repeatable).")] = None,
    validation: Annotated[
        str | None, typer.Option(help="Target-task examples (the gradient and importance criteria).")
    ] = None,
    plan: Annotated[str | None, typer.Option(help="A plan: gradient features on its support.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every random choice.")] = None,
    task: Annotated[str | None, typer.Option(help="auto, classification or causal_lm.")] = None,
    stratify: Annotated[
        bool | None,
        typer.Option(
            "--stratify/--no-stratify",
            help="Keep each class's share of the budget (classification; not dedup).",
        ),
    ] = None,
    keys: Annotated[bool, typer.Option("--keys", help="List every config key and data criterion.")] = False,
) -> None:
    """Choose which training examples are worth training on; write a manifest with a data hash."""
    from surgical.recipes.config import load_config
    from surgical.recipes.select_data import SelectDataConfig, run_select_data

    if keys:
        _print_keys(SelectDataConfig)
        _print_registries(("data-criteria",))
        return
    overrides = _set(set_)
    overrides.update(
        _flags({
            "model.path": model, "model.task": task, "data.path": data, "out": out, "method": method,
            "fraction": fraction, "count": count, "validation": validation, "plan": plan, "seed": seed,
            "stratify": stratify,
        })
    )  # fmt: skip
    for key, value in _options(option).items():
        overrides[f"options.{key}"] = value
    run_select_data(load_config(SelectDataConfig, config, overrides), console)


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
    from surgical.recipes.deltas import apply_deltas

    apply_deltas(base, deltas, out, scales=scale, force=force, console=console)


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
        from surgical.recipes.select import inspect_plan

        inspect_plan(path, png, console)
    else:
        from surgical.recipes.deltas import inspect_delta

        inspect_delta(path, png, console)


@app.command()
def export(
    delta_dir: Annotated[str, typer.Argument(help="A delta directory.")],
    base: Annotated[str, typer.Option(help="Base model directory the delta was trained on.")],
    out: Annotated[str, typer.Option(help="Directory for the exported adapter.")],
    to: Annotated[
        str, typer.Option("--to", help="Target format (`surgical list export-formats`).")
    ] = "peft-shira",
    force: Annotated[bool, typer.Option(help="Export even if the base fingerprint differs.")] = False,
) -> None:
    """Export a delta to another library's format (a PEFT SHiRA adapter)."""
    from surgical.recipes.deltas import export_delta

    export_delta(delta_dir, base, out, to=to, force=force, console=console)


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
    from surgical.recipes.deltas import diff_models

    diff_models(base, finetuned, out, density=density, dtype=dtype, console=console)


@app.command("import-lora")
def import_lora(
    adapter: Annotated[str, typer.Argument(help="PEFT LoRA adapter directory (safetensors).")],
    base: Annotated[str, typer.Option(help="Base model directory, to record its fingerprint.")],
    out: Annotated[str, typer.Option(help="Directory for the delta.")],
    dtype: Annotated[
        str, typer.Option(help="Value storage: float32, float16, bfloat16, int8, sign.")
    ] = "float32",
) -> None:
    """Import a PEFT LoRA adapter as a dense delta."""
    from surgical.recipes.deltas import import_lora as run

    run(adapter, base, out, dtype=dtype, console=console)


def main() -> None:
    """Entry point: one line and exit status 2 for bad input, 130 for an interrupt, no traceback."""
    from typer._click import exceptions as click_exceptions  # typer vendors click

    global console, err_console
    console, err_console = plain_console(), plain_console(stderr=True)  # sized for the terminal of this run
    try:
        result = app(prog_name="surgical", standalone_mode=False)
    except SurgicalError as e:
        _fail(str(e))
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("[bold red]interrupted[/]", markup=True)
        sys.exit(130)
    except click_exceptions.UsageError as e:  # missing, unknown or malformed options and commands
        command = e.ctx.command_path if e.ctx is not None else "surgical"
        _fail(f"{e.format_message().rstrip('.')}. See `{command} --help`", e.exit_code)
    except click_exceptions.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except OSError as e:  # disk full, permission denied, ...: nothing already on disk was replaced
        where = f" {e.filename!r}" if e.filename else ""
        _fail(
            f"cannot read or write{where}: {e.strerror or e}. "
            "Check the path, its permissions and the free space"
        )
    if isinstance(result, int) and result != 0:  # e.g. 130 when typer saw the interrupt itself
        sys.exit(result)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    sys.exit(code)
