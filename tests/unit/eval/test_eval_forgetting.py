"""surgical.eval.forgetting: one model toggled by a delta equals two models; zero delta, zero."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama
from surgical import Delta, SurgicalError, apply
from surgical.core.fingerprint import base_identity
from surgical.core.marks import applied_stack
from surgical.eval import evaluate, forgetting


def _padded_lm_batches() -> list[dict]:
    """LM reference batches with right padding (mask 0, label -100) in some rows."""
    batches = lm_batches(n=3, batch=3, seq=10)
    for b in batches[:2]:
        b["attention_mask"][1, 7:] = 0
        b["labels"][1, 7:] = -100
    return batches


def _tuned(model, seed: int = 3, scale: float = 0.05):
    """A copy of ``model`` with noise on a few weights, and the dense delta between them."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (_, p) in enumerate(tuned.named_parameters()):
            if i % 3 == 0:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return tuned, Delta.from_models(model, tuned)


def _zero_delta(model) -> Delta:
    """Entries of exact zeros on every matrix (every 5th value)."""
    d = Delta(meta={"base": base_identity(model)})
    for name, p in model.named_parameters():
        if p.dim() == 2:
            d.entries[name] = (torch.arange(0, p.numel(), 5), torch.zeros(len(range(0, p.numel(), 5))))
            d.shapes[name] = tuple(p.shape)
    return d


@pytest.mark.parametrize("kind", ["causal_lm", "classification"])
def test_a_zero_delta_forgets_exactly_nothing(kind):
    model = tiny_llama() if kind == "causal_lm" else tiny_bert()
    ref = _padded_lm_batches() if kind == "causal_lm" else cls_batches(n=2)
    for delta in (_zero_delta(model), Delta(meta={"base": base_identity(model)})):
        got = forgetting(model, ref, delta=delta, show=False)
        assert got["loss_change"] == 0.0
        assert got["kl"] == 0.0
        assert got["loss_base"] == got["loss_tuned"] > 0


@pytest.mark.parametrize("kind", ["causal_lm", "classification"])
def test_toggling_one_model_equals_two_models(kind):
    base = tiny_llama() if kind == "causal_lm" else tiny_bert()
    ref = _padded_lm_batches() if kind == "causal_lm" else cls_batches(n=3)
    tuned, delta = _tuned(base)
    one = forgetting(base, ref, delta=delta, show=False)
    two = forgetting(tuned, ref, base_model=base, show=False)
    assert one.keys() == two.keys()
    for k in one:
        assert one[k] == pytest.approx(two[k], abs=1e-6, rel=1e-6), k
    assert one["kl"] > 1e-4 and one["loss_change"] != 0.0
    # the losses are evaluate's losses of the two models
    ev = (
        evaluate(base, {"r": ref}, show=False)["r"]["loss"],
        evaluate(tuned, {"r": ref}, show=False)["r"]["loss"],
    )
    assert (one["loss_base"], one["loss_tuned"]) == pytest.approx(ev, rel=1e-6)


def test_kl_matches_a_hand_computation_over_attended_positions():
    base = tiny_llama()
    tuned, delta = _tuned(base)
    ref = _padded_lm_batches()
    total, n = 0.0, 0
    with torch.no_grad():
        for b in ref:
            lp_b = F.log_softmax(
                base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, -1
            )
            lp_t = F.log_softmax(
                tuned(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, -1
            )
            kl = (lp_b.exp() * (lp_b - lp_t)).sum(-1)
            keep = b["attention_mask"] == 1
            total += kl[keep].sum().item()
            n += int(keep.sum())
    got = forgetting(base, ref, delta=delta, show=False)
    assert got["positions"] == n == 3 * 3 * 10 - 2 * 3
    assert got["kl"] == pytest.approx(total / n, rel=1e-4)


def test_the_base_is_bit_identical_after_forgetting_with_a_delta():
    base = tiny_llama().train()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    _, delta = _tuned(base)
    forgetting(base, _padded_lm_batches(), delta=delta, show=True)  # with its progress bar
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert not applied_stack(base)
    assert base.training
    assert all(p.grad is None for p in base.parameters())


def test_forgetting_works_over_other_applied_deltas():
    """The model may carry a delta already (then it is the base the measured delta was made on)."""
    base = tiny_llama()
    _, d1 = _tuned(base, seed=1)
    apply(base, d1)
    _, d2 = _tuned(base, seed=2)  # made on base + d1: deltas on one base share its fingerprint
    ref = lm_batches(n=1)
    got = forgetting(base, ref, delta=d2, show=False)
    assert got["kl"] > 0 and len(applied_stack(base)) == 1


def _one_line(excinfo) -> str:
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_bad_input_is_a_one_line_error():
    base = tiny_llama()
    tuned, delta = _tuned(base)
    ref = lm_batches(n=1)
    with pytest.raises(SurgicalError) as e:
        forgetting(base, ref, show=False)
    assert "exactly one of delta and base_model" in _one_line(e)
    with pytest.raises(SurgicalError) as e:
        forgetting(base, ref, delta=delta, base_model=tuned, show=False)
    assert "exactly one of delta and base_model" in _one_line(e)
    with pytest.raises(SurgicalError) as e:
        forgetting(base, [{"input_ids": ref[0]["input_ids"]}], delta=delta, show=False)
    assert "reference set 'reference' has no labels" in _one_line(e)
    with pytest.raises(SurgicalError) as e:  # a delta of another base
        forgetting(tiny_llama(seed=7), ref, delta=delta, show=False)
    assert "not the base the delta was trained on" in _one_line(e)
    with pytest.raises(SurgicalError) as e:  # a delta for another architecture
        forgetting(tiny_bert(), cls_batches(n=1), delta=delta, show=False)
    assert "which this model does not have" in _one_line(e)
