"""surgical.eval.evaluate against hand computations on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama
from surgical import SurgicalError
from surgical.eval import evaluate, predict


def _uneven_cls_batches() -> list[dict]:
    """Batches of 8, 8 and 3 examples: a mean of batch means would differ from the set's mean."""
    b = cls_batches(n=3)
    b[-1] = {k: v[:3] for k, v in b[-1].items()}
    return b


def test_classification_accuracy_and_loss_match_a_hand_computation():
    model, batches = tiny_bert(), _uneven_cls_batches()
    with torch.no_grad():
        logits = torch.cat(
            [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
        )
    labels = torch.cat([b["labels"] for b in batches])
    got = evaluate(model, {"id": batches}, show=False)["id"]
    assert set(got) == {"accuracy", "loss", "examples"}
    assert got["examples"] == 19
    assert got["accuracy"] == int((logits.argmax(-1) == labels).sum()) / 19
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_sets_keep_their_order_and_predict_agrees():
    model = tiny_bert()
    sets = {"ood": cls_batches(n=2, seed=5), "id": cls_batches(n=2, seed=6)}
    got = evaluate(model, sets, task="classification", show=False)
    assert list(got) == ["ood", "id"]
    _, _, acc = predict(model, sets["id"], show=False)
    assert got["id"]["accuracy"] == pytest.approx(acc)


def _masked_lm_batches() -> list[dict]:
    """Two batches with different numbers of labelled tokens (token weighting matters)."""
    b = lm_batches(n=2, batch=3, seq=10)
    b[0]["labels"][:, :4] = -100
    b[1]["labels"][0, 6:] = -100
    return b


def test_causal_lm_loss_is_the_token_mean_and_perplexity_its_exp():
    model, batches = tiny_llama(), _masked_lm_batches()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            shift_logits, shift_labels = logits[:, :-1].reshape(-1, 100), b["labels"][:, 1:].reshape(-1)
            total += F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum").item()
            count += int((shift_labels != -100).sum())
    got = evaluate(model, {"text": batches}, show=False)["text"]
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
    # text modelled whole (labels = input_ids, no masked attended position): no answer is marked
    plain = evaluate(model, {"text": lm_batches(n=1)}, show=False)["text"]
    assert "answer_accuracy" not in plain


def test_answer_accuracy_counts_examples_whose_every_answer_token_is_the_argmax():
    model = tiny_llama()
    prompt = torch.tensor([5, 17, 42, 8])
    ids = prompt.clone()
    with torch.no_grad():
        for _ in range(4):  # greedy answer: every answer token is the model's argmax
            nxt = model(input_ids=ids[None]).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt[None]])
    wrong = ids.clone()
    wrong[-1] = (wrong[-1] + 1) % 100  # one answer token off: the example fails
    input_ids = torch.stack([ids, wrong])
    labels = input_ids.clone()
    labels[:, : len(prompt)] = -100  # the prompt carries no loss: the labels mark an answer
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    got = evaluate(model, {"qa": [batch]}, show=False)["qa"]
    assert got["answer_accuracy"] == 0.5
    assert got["tokens"] == 8


def test_model_mode_is_restored_and_no_gradient_is_taken():
    model = tiny_bert().train()
    evaluate(model, {"id": cls_batches(n=1)}, show=True)  # with its progress bar
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    evaluate(model, {"id": cls_batches(n=1)}, show=False)
    assert not model.training


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_a_set_without_labels_is_a_one_line_error_before_anything_runs():
    calls = []
    model = tiny_bert()
    model.register_forward_hook(lambda *a: calls.append(1))
    ood = [{k: v for k, v in b.items() if k != "labels"} for b in cls_batches(n=1)]
    with pytest.raises(SurgicalError) as e:
        evaluate(model, {"id": cls_batches(n=1), "ood": ood}, show=False)
    assert "set 'ood' has no labels" in _one_line(e)
    assert not calls


@pytest.mark.parametrize(
    "sets, kwargs, words",
    [
        ({"id": []}, {}, "set 'id' is empty"),
        ({}, {}, "mapping of set names"),
        ({"id": cls_batches(n=1)}, {"task": "regression"}, "task must be one of"),
        ({"id": cls_batches(n=1)}, {"task": "causal_lm"}, "needs 3-D logits"),
        ({"id": [torch.zeros(2)]}, {}, "not a dict batch"),
    ],
)
def test_bad_input_is_a_one_line_error(sets, kwargs, words):
    with pytest.raises(SurgicalError) as e:
        evaluate(tiny_bert(), sets, show=False, **kwargs)
    assert words in _one_line(e)
