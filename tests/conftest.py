"""Shared fixtures: tiny random models built from configs (milliseconds, no files)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from surgical.core.runtime import quiet_transformers

quiet_transformers()
# Tiny models gain nothing from threads, and on a busy shared machine two spinning OpenMP
# threads make them ~30x slower (measured: a 10-step fit, 0.11 s vs 2.9 s).
torch.set_num_threads(1)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def cls_batches(n: int = 4, batch: int = 8, seq: int = 12, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (batch, seq), generator=g)
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 2, (batch,), generator=g),
            }
        )
    return out


def lm_batches(n: int = 4, batch: int = 4, seq: int = 12, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def batches():
    return cls_batches()


def clone(model):
    return copy.deepcopy(model)


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Runs `surgical ARGS` in-process on a wide terminal; returns (exit code, stdout, stderr)."""
    import sys

    from surgical import cli

    monkeypatch.setattr(sys, "argv", ["surgical", *args])
    monkeypatch.setenv("COLUMNS", "250")  # no wrapping inside asserted text
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err
