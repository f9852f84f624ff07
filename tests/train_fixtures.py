"""Tiny on-disk models, tokenizers and data files for end-to-end training tests (no downloads)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

WORDS = "good bad great awful fine poor nice dull fun boring the a movie film plot was is very not".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def save_tiny_model(path: Path, kind: str) -> Path:
    """Writes a tiny random BERT classifier (``kind="bert"``) or Llama LM (``"llama"``) with tokenizer."""
    from conftest import tiny_bert, tiny_llama

    model = tiny_bert() if kind == "bert" else tiny_llama()
    model.config.pad_token_id = 0
    model.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return path


def write_cls_csv(path: Path, n: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for _ in range(n):
            label = rng.randint(0, 1)
            word = rng.choice(["good", "great", "fun"] if label else ["bad", "awful", "dull"])
            w.writerow([f"the movie was very {word} {rng.choice(WORDS)}", label])
    return path


def write_cls_dataset_dict(path: Path, n: int = 48, seed: int = 0) -> Path:
    """The rows of :func:`write_cls_csv` as a ``DatasetDict`` (train: all, test: the first 8) on disk."""
    import datasets

    with open(write_cls_csv(path.with_suffix(".csv"), n, seed), newline="") as fh:
        rows = [{"text": r["text"], "label": int(r["label"])} for r in csv.DictReader(fh)]
    train = datasets.Dataset.from_list(rows)
    datasets.DatasetDict(train=train, test=train.select(range(8))).save_to_disk(str(path))
    return path


def write_instruct_jsonl(path: Path, n: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            word = rng.choice(WORDS)
            fh.write(
                json.dumps({"prompt": f"the film was {word}", "response": f"{word} {word} movie"}) + "\n"
            )
    return path


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def tiny_chat_tokenizer():
    """The tiny word-level tokenizer with role words and a simple chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + ["system", "user", "assistant", ":"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def conversations(n: int = 16, seed: int = 0) -> list[list[dict[str, str]]]:
    """Two-turn sentiment conversations over the tiny vocabulary."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(["good", "great", "fun"] if label else ["bad", "awful", "dull"])
        out.append(
            [
                {"role": "system", "content": "the movie"},
                {"role": "user", "content": f"the film was {word}"},
                {"role": "assistant", "content": "good" if label else "bad"},
                {"role": "user", "content": "is it fun"},
                {"role": "assistant", "content": "very fun" if label else "not fun"},
            ]
        )
    return out


def save_tiny_chat_model(path: Path) -> Path:
    """The tiny random Llama with the chat tokenizer (role words and a chat template)."""
    from conftest import tiny_llama

    model = tiny_llama()
    model.config.pad_token_id = 0
    model.save_pretrained(str(path))
    tiny_chat_tokenizer().save_pretrained(str(path))
    return path


def write_chat_jsonl(path: Path, n: int = 16, seed: int = 0, convs: list | None = None) -> Path:
    """JSON lines with a ``messages`` column: :func:`conversations` (or ``convs``)."""
    with open(path, "w") as fh:
        for conv in convs if convs is not None else conversations(n, seed):
            fh.write(json.dumps({"messages": conv}) + "\n")
    return path


def run_two_processes(
    script: Path, *args: str, launcher: list[str] | None = None, env: dict | None = None, timeout: int = 240
) -> str:
    """Runs ``script args`` as 2 processes (default: ``torchrun --standalone``, found next to the
    interpreter) with ``src/`` on PYTHONPATH, one thread each and ``env`` added; returns stderr.

    Skips the calling test when the launcher is missing; fails it when the run exits non-zero or
    outlives ``timeout``, after killing the launcher and every worker.
    """
    import os
    import shutil
    import signal
    import subprocess
    import sys

    import pytest

    cmd = list(launcher or ["torchrun", "--standalone", "--nproc_per_node", "2"])
    exe = shutil.which(cmd[0], path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip(f"no {cmd[0]} next to the interpreter")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
    p = subprocess.Popen(
        [exe, *cmd[1:], str(script), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and both workers: never leave them running
        p.communicate()
        pytest.fail(f"the two-process run did not finish in {timeout} s")
    assert p.returncode == 0, err[-3000:]
    return err


def assert_resume_with_regrow_is_exact(prepared, batches: list[dict], ckpt: Path, stop_at: int, **run):
    """Trains ``prepared()`` with prune-and-regrow once uninterrupted (some entries must move),
    once stopped after step ``stop_at`` and resumed from its checkpoints in ``ckpt``; the two
    deltas must be identical (indices and values). Returns the uninterrupted model."""
    import pytest
    import torch

    import surgical as sg
    from surgical.train import Regrow
    from surgical.train.hooks import TrainHook

    class Stop(TrainHook):
        def on_step_end(self, state):
            if state.step == stop_at:
                raise KeyboardInterrupt

    def hooks():
        return [Regrow(every=2, fraction=0.2)]

    whole = prepared()
    grow = hooks()
    sg.fit(whole, batches, hooks=grow, **run)
    assert grow[0].changes > 0  # entries moved
    with pytest.raises(KeyboardInterrupt):
        sg.fit(prepared(), batches, checkpoint_dir=ckpt, hooks=[*hooks(), Stop()], **run)
    resumed = prepared()
    sg.fit(resumed, batches, checkpoint_dir=ckpt, resume=True, hooks=hooks(), **run)
    dw, dr = sg.extract(whole), sg.extract(resumed)
    for name, (idx, vals) in dw.entries.items():
        assert torch.equal(dr.entries[name][0], idx) and torch.equal(dr.entries[name][1], vals), name
    return whole


def assert_quantized_resume_is_exact(quantized, batches: list[dict], ckpt: Path) -> None:
    """:func:`assert_resume_with_regrow_is_exact` on ``quantized()`` (a quantized model and its
    plan, first), prepared: 4 steps stopped after 3, checkpoints every 2."""
    import surgical as sg

    def prepared():
        model, plan, *_ = quantized()
        return sg.prepare(model, plan)

    run = dict(max_steps=4, lr=1e-2, show=False, checkpoint_every=2)
    assert_resume_with_regrow_is_exact(prepared, batches, ckpt, stop_at=3, **run)


def assert_delta_applies_to_fp32(delta, plan, fp32):
    """``delta`` (trained on a quantized base) names the full-precision base ``fp32()`` builds and
    applies to it exactly: base + delta at the entries. Returns that base with the delta."""
    import torch

    import surgical as sg

    made_on_fp32 = sg.extract(sg.prepare(fp32(), plan))
    assert delta.meta["base"]["fingerprint"] == made_on_fp32.meta["base"]["fingerprint"]
    base = fp32()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    sg.apply(base, delta)
    for name, (idx, vals) in delta.entries.items():
        assert torch.equal(base.get_parameter(name).view(-1)[idx], before[name].view(-1)[idx] + vals)
    return base


def assert_grads_match_dequantized(model, ref, plan, dequantize, batch: dict) -> None:
    """``model`` (prepared on a quantized base) and ``ref`` (the same architecture, given the
    dequantized weights here and prepared additively) must give the delta the same gradients."""
    import torch

    import surgical as sg
    from surgical.core.tensors import is_quantized

    for name, p in ref.named_parameters():
        q = model.get_parameter(name)
        with torch.no_grad():
            p.copy_(dequantize(q) if is_quantized(q) else q)
    sg.prepare(ref, plan, additive=True)
    model(**batch).loss.backward()
    ref(**batch).loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)
