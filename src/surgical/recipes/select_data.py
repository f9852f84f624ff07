"""``surgical select-data``: model + data -> a data-selection manifest (which examples to train on).

Examples are built by the one batch builder (:func:`surgical.recipes.data.make_batches`) with
the data section's settings, one example per batch, so a selection indexes exactly the examples
``surgical train`` builds from the same data section (the manifest's hash of the tokenized
examples checks it). ``data.batch_size`` is the scoring batch size. The output directory holds
``selection.json`` (method, options, the data hash, provenance, cost) and
``selection.safetensors`` (indices and scores).

:class:`DataSelectionConfig` and :func:`selected_batches` are the ``data_selection:`` section of
a training run and what it does to the training batches; :class:`TokenSelectionConfig` and
:func:`token_filter` the ``token_selection:`` section and the per-step batch filter it needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from surgical.core.errors import SurgicalError
from surgical.core.io import check_output, check_replaceable
from surgical.core.runtime import plain_console
from surgical.data import (
    DATA_CRITERIA,
    TOKEN_CRITERIA,
    DataSelection,
    batches_of,
    select_data,
    split_batches,
    token_mask,
)
from surgical.data.criteria import stratifies, stratifying
from surgical.data.select_data import INFO_FILE
from surgical.data.trajectory import rising_shares
from surgical.delta.delta import CONFIG_FILE
from surgical.recipes.config import DataConfig, ModelConfig, _f
from surgical.recipes.data import make_batches
from surgical.recipes.models import check_model_dir, detect_task, load_model, load_tokenizer


@dataclass(frozen=True)
class SelectDataConfig:
    """A ``surgical select-data`` run."""

    out: str = _f(
        "surgical-data-selection", "Directory for the selection (selection.json, selection.safetensors)."
    )
    seed: int = _f(0, "Seed of every random choice (and of a new classification head).")
    model: ModelConfig = field(
        default_factory=ModelConfig, metadata={"help": "The model that scores the data."}
    )
    data: DataConfig = field(
        default_factory=DataConfig,
        metadata={"help": "The data to select from (batch_size: examples per scoring forward pass)."},
    )
    method: str = _f("random", "Data criterion (`surgical list data-criteria`).")
    fraction: float | None = _f(0.3, "Share of the examples to keep.", low=0, high=1, low_open=True)
    count: int | None = _f(None, "Number of examples to keep instead of a fraction.", low=1)
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "The criterion's own options (`surgical list data-criteria`)."},
    )
    validation: str | None = _f(
        None,
        "gradient, importance: validation data of the target task, read with the data section's settings.",
    )
    plan: str | None = _f(
        None, "gradient: a saved plan whose support the gradient features are restricted to."
    )
    stratify: bool = _f(
        False, "Classification: keep each class's share of the budget (every criterion but dedup)."
    )
    show: int = _f(5, "Examples shown in the summary (highest scores, or first picks).", low=0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form."""
        return dataclasses.asdict(self)

    def budget(self) -> dict[str, Any]:
        """``fraction`` / ``count`` as ``select_data`` takes them: a count replaces the fraction."""
        return (
            {"fraction": None, "count": self.count} if self.count is not None else {"fraction": self.fraction}
        )

    def check(self) -> None:
        """Checks what the dataclasses alone cannot, before anything is loaded."""
        if not self.model.path or not self.data.path:
            raise SurgicalError("select-data needs a model and data", "Pass MODEL and --data FILE")
        check_section(
            self.method,
            self.options,
            self.fraction,
            self.count,
            self.validation,
            self.plan,
            "",
            self.stratify,
        )


def check_section(
    method: str,
    options: dict[str, Any],
    fraction: float | None,
    count: int | None,
    validation: str | None,
    plan: str | None,
    prefix: str,
    stratify: bool = False,
) -> None:
    """The checks a data-selection config shares with the ``data_selection:`` section of a run."""
    DATA_CRITERIA.resolve(method, options, f"{prefix}options.")
    if stratify and not stratifies(method):
        raise SurgicalError(
            f"{prefix}stratify does not apply to {method!r}, which chooses a set without regard to classes",
            f"Set {prefix}stratify false, or use another criterion ({', '.join(stratifying())})",
        )
    extra = DATA_CRITERIA.entry(method).extra
    if fraction is None and count is None:
        raise SurgicalError(f"{prefix}fraction and {prefix}count are both unset", "Set one of them")
    if extra.get("needs_validation") and not validation:
        how = "Pass --validation FILE (validation: in a config)" if not prefix else f"Set {prefix}validation"
        raise SurgicalError(
            f"data criterion {method!r} needs {prefix or 'the '}validation data (its target set)",
            f"{how}: examples like those the model should do well on",
        )
    if validation and not extra.get("needs_validation"):
        users = [n for n in DATA_CRITERIA.names() if DATA_CRITERIA.entry(n).extra.get("needs_validation")]
        raise SurgicalError(
            f"{prefix}validation is used only by methods {', '.join(users)}", f"Remove {prefix}validation"
        )
    if plan and method != "gradient":
        raise SurgicalError(f"{prefix}plan is used only by method gradient", f"Remove {prefix}plan")


def build_examples(d: DataConfig, task: str, tokenizer, *, num_labels: int | None = None) -> list:
    """The data section's examples, one per entry (one conversation each: never packed), as the
    batch builder tokenizes them."""
    one = dataclasses.replace(d, batch_size=1, packing=False)
    return split_batches(make_batches(one, task, tokenizer, num_labels=num_labels))


def run_select_data(
    cfg: SelectDataConfig, console: Console | None = None, show: bool = True
) -> DataSelection:
    """Selects examples, saves the manifest to ``cfg.out`` and prints a summary.

    Raises:
        SurgicalError: bad config (checked before the model loads), unreadable data or plan, an
            output directory that is something else.
    """
    console = console or plain_console()
    cfg.check()
    inputs = {"model": cfg.model.path, "data": cfg.data.path}
    inputs.update({k: v for k, v in (("validation data", cfg.validation), ("plan", cfg.plan)) if v})
    out = check_output(cfg.out, inputs, "out")
    check_replaceable(out, INFO_FILE, "selection", "out")
    check_model_dir(cfg.model.path, "model.path")
    params = None
    if cfg.plan:
        from surgical.select import Plan

        params = Plan.load(cfg.plan)
    task = detect_task(cfg.model.path) if cfg.model.task == "auto" else cfg.model.task
    if DATA_CRITERIA.entry(cfg.method).extra.get("needs_model"):
        model, tok = load_model(
            cfg.model.path, task, num_labels=cfg.model.num_labels, seed=cfg.seed, label="model.path"
        )
    else:  # random, dedup, importance read tokens only: the weights are not loaded at all
        model, tok = None, load_tokenizer(cfg.model.path, "model.path")
    examples = build_examples(cfg.data, task, tok, num_labels=cfg.model.num_labels)
    validation = None
    if cfg.validation:
        d = dataclasses.replace(cfg.data, path=cfg.validation)
        validation = build_examples(d, task, tok, num_labels=cfg.model.num_labels)
    sel = select_data(
        model, examples, method=cfg.method, **cfg.budget(), seed=cfg.seed, validation=validation,
        params=params, batch_size=cfg.data.batch_size, pad_id=_pad_id(tok), stratify=cfg.stratify,
        progress=show, **cfg.options,
    )  # fmt: skip
    sel.meta.update(model=str(cfg.model.path), data=str(cfg.data.path), task=task, config=cfg.to_dict())
    sel.save(out)
    console.print(f"wrote selection {cfg.out}: {sel.summary()}")
    print_summary(sel, examples, tok, console, cfg.show)
    return sel


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


RISING_NOTE = 0.2  # the share of a trajectory kept set in rising clusters worth a note


def print_summary(sel: DataSelection, examples: list, tokenizer, console: Console, n: int) -> None:
    """Cost line and a table of the first ``n`` kept examples (highest scores first, if scored)."""
    m = sel.meta
    bits = [
        f"{m.get('examples_per_second') or 0:,.1f} examples/s",
        f"peak memory {m.get('peak_memory_bytes', 0) / 2**20:,.0f} MiB",
    ]
    if "kept" in m:
        bits.append(f"{m['kept']:,} survive deduplication")
    console.print(f"cost: {', '.join(bits)}")
    if "log_weights" in m:
        q, kl = m["log_weights"], m.get("kl_to_target")
        console.print(
            f"log importance weights: median {q['median']:.4g} (10-90%: {q['p10']:.4g} to {q['p90']:.4g}); "
            f"target n-grams found in the pool: {100 * m['target_coverage']:.0f}%"
            + (f"; n-gram KL to the target: pool {kl['pool']:.3f}, kept {kl['kept']:.3f} nats" if kl else "")
        )
        if kl and kl["kept"] >= kl["pool"]:
            console.print(
                "[yellow]note:[/] the kept examples look no more like the target than the whole pool "
                "(its n-grams are not in the pool, or the budget keeps nearly all of it)",
                markup=True,
            )
    if "cluster_sizes" in m:
        sizes = zip(m["kept_by_cluster"], m["cluster_sizes"], strict=True)
        pairs = ", ".join(f"{k:,}/{n:,}" for k, n in sizes)
        console.print(f"{m['clusters']} loss-trajectory clusters, kept/size: {pairs}")
        shares = rising_shares(m)
        if shares is not None and shares[1] >= RISING_NOTE and shares[1] > shares[0]:
            console.print(
                f"[yellow]note:[/] {100 * shares[1]:.0f}% of the kept examples ({100 * shares[0]:.0f}% of "
                f"the data) are in clusters whose loss rose during the proxy training "
                f"({', '.join(map(str, m['rising_clusters']))}): examples that go against the rest; on "
                "a classifier such a set can train to chance (docs/data.md). meta['kept_clusters'] "
                "gives each kept example's cluster, to drop them",
                markup=True,
            )
    if n == 0:
        return
    order = sel.indices.tolist()
    if sel.scores is not None:
        order.sort(key=lambda i: (-float(sel.scores[i]), i))
    t = Table(title=f"{sel.method}: {'highest-scoring' if sel.scores is not None else 'some'} kept examples")
    t.add_column("index", justify="right")
    if sel.scores is not None:
        t.add_column("score", justify="right")
    t.add_column("text")
    for i in order[:n]:
        text = tokenizer.decode(examples[i]["input_ids"].tolist(), skip_special_tokens=True)
        text = text if len(text) <= 80 else text[:77] + "..."
        cells = [str(i)] + ([f"{float(sel.scores[i]):.4g}"] if sel.scores is not None else []) + [text]
        t.add_row(*cells)
    console.print(t)


@dataclass(frozen=True)
class DataSelectionConfig:
    """The ``data_selection:`` section of a training run: train on a selection of the data."""

    method: str = _f("none", "'none' (all the data) or a data criterion (`surgical list data-criteria`).")
    fraction: float | None = _f(0.3, "Share of the examples to train on.", low=0, high=1, low_open=True)
    count: int | None = _f(None, "Number of examples instead of a fraction.", low=1)
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "The criterion's own options."})
    validation: str | None = _f(None, "gradient, importance: validation data of the target task.")
    manifest: str | None = _f(
        None, "A saved selection (surgical select-data) to train on instead of selecting."
    )
    stratify: bool = _f(
        False, "Classification: keep each class's share of the budget (every criterion but dedup)."
    )

    def check(self) -> None:
        """Checks before anything is loaded."""
        if self.manifest is not None or self.method == "none":
            return
        check_section(
            self.method, self.options, self.fraction, self.count, self.validation, None, "data_selection.",
            self.stratify,
        )  # fmt: skip


def selected_batches(
    section: DataSelectionConfig,
    model,
    tokenizer,
    data: DataConfig,
    task: str,
    *,
    num_labels: int | None = None,
    seed: int = 0,
    params: Any = None,
    show: bool = True,
) -> tuple[list[dict], DataSelection | None]:
    """The training batches of ``data`` restricted to the section's selection, and the selection.

    With ``method: none`` and no manifest, every example in the batch builder's order and None.
    A manifest is checked against the data (a SurgicalError if it was made for other data);
    otherwise the selection is made here on the base ``model`` (``params``: the plan, for
    ``gradient``). The selected examples keep their order and are re-batched by
    ``data.batch_size``.
    """
    if section.manifest is None and section.method == "none":
        return make_batches(data, task, tokenizer, num_labels=num_labels), None
    section.check()
    if data.packing:
        raise SurgicalError(
            "data_selection does not work with data.packing (packed rows mix examples)",
            "Set data.packing false, or data_selection.method none",
        )
    examples = build_examples(data, task, tokenizer, num_labels=num_labels)
    if section.manifest is not None:
        sel = DataSelection.load(section.manifest)
        sel.check(examples)
    else:
        validation = None
        if section.validation:
            validation = build_examples(dataclasses.replace(data, path=section.validation), task, tokenizer,
                                        num_labels=num_labels)  # fmt: skip
        budget = {"count": section.count} if section.count is not None else {"fraction": section.fraction}
        sel = select_data(
            model, examples, method=section.method, **budget, seed=seed, validation=validation, params=params,
            batch_size=data.batch_size, pad_id=_pad_id(tokenizer), stratify=section.stratify, progress=show,
            **section.options,
        )  # fmt: skip
    return batches_of(examples, sel.indices, data.batch_size, _pad_id(tokenizer)), sel


def selection_dir(out: str | Path) -> Path:
    """Where a training run keeps the selection it trained on (beside its delta)."""
    return Path(out) / "data-selection"


@dataclass(frozen=True)
class TokenSelectionConfig:
    """The ``token_selection:`` section of a causal-LM training run: which target tokens are trained."""

    method: str = _f("none", "'none' (every target token) or a token criterion: excess_loss, random.")
    fraction: float = _f(0.6, "Share of each example's target tokens trained.", low=0, high=1, low_open=True)
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "The criterion's own options."})
    reference: str = _f(
        "base",
        "excess_loss's reference: 'base' (the model with its trained values toggled off, no extra memory) "
        "or a delta directory trained on target data (Rho-1's reference: a second copy of the model, "
        "the base with that delta applied).",
    )

    def check_reference(self) -> None:
        """The reference's checks, which need no task: run with the config's first checks."""
        if self.reference != "base":
            if self.method != "excess_loss":
                raise SurgicalError(
                    f"token_selection.reference is used by excess_loss only, the method is {self.method}",
                    "Remove token_selection.reference, or set token_selection.method excess_loss",
                )
            if not (Path(self.reference) / CONFIG_FILE).is_file():
                raise SurgicalError(
                    f"token_selection.reference {self.reference!r} is not a delta directory "
                    f"(no {CONFIG_FILE})",
                    "Pass 'base', or a directory written by `surgical train` or Delta.save",
                )

    def check(self, task: str) -> None:
        """Checks before anything is loaded."""
        self.check_reference()
        if self.method == "none":
            return
        TOKEN_CRITERIA.resolve(self.method, self.options, "token_selection.options.")
        if task != "causal_lm":
            raise SurgicalError(
                f"token_selection needs a causal LM, the task is {task}", "Set token_selection.method none"
            )


def token_filter(
    section: TokenSelectionConfig, reference: Any = None, seed: int = 0
) -> Callable[[Any, dict, int], dict] | None:
    """A per-step batch filter ``(model, batch, step) -> batch`` that replaces the batch's labels
    by :func:`surgical.data.token_mask`'s (None with ``method: none``).

    ``reference`` is the excess-loss reference (the base model, or a ``(batch) -> logits``
    function that runs the model with its trained values toggled off). ``random`` draws a new
    mask every step (seed ``seed + step``), the same at the same step of a resumed run.
    """
    if section.method == "none":
        return None

    def apply(model: Any, batch: dict, step: int) -> dict:
        labels = token_mask(
            model, batch, method=section.method, fraction=section.fraction, reference=reference,
            seed=seed + step, **section.options,
        )  # fmt: skip
        return {**batch, "labels": labels}

    return apply
