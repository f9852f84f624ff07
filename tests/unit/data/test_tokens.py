"""token_mask: exact fractions, prompt and padding never unmasked, excess loss against a naive
per-token computation, the free base reference through a delta, the report, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from surgical.core.errors import SurgicalError
from surgical.data.tokens import TOKEN_CRITERIA, ReferenceLosses, keep_top, token_mask, token_report


def _batch(seed: int = 0) -> dict:
    """4 examples of 12 tokens: prompts of 0-4 tokens (labels -100), right padding of 0-3 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (4, 12), generator=g)
    labels = ids.clone()
    mask = torch.ones_like(ids)
    for i, (prompt, pad) in enumerate([(0, 0), (4, 2), (2, 3), (3, 0)]):
        labels[i, :prompt] = -100
        if pad:
            mask[i, -pad:] = 0
            labels[i, -pad:] = -100
            ids[i, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _targets(batch):
    t = (batch["labels"] != -100) & (batch["attention_mask"] != 0)
    t[:, 0] = False
    return t


def _naive_token_losses(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = torch.zeros(batch["labels"].shape)
    for i in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            if batch["labels"][i, t] != -100:
                out[i, t] = F.cross_entropy(logits[i, t - 1][None].float(), batch["labels"][i, t][None])
    return out


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.6, 1.0])
@pytest.mark.parametrize("method", ["random", "excess_loss"])
def test_each_example_keeps_its_fraction_of_targets_and_nothing_else(method, fraction):
    batch = _batch()
    model, ref = tiny_llama(0), tiny_llama(1)
    new = token_mask(model, batch, method=method, fraction=fraction, reference=ref, seed=3)
    targets = _targets(batch)
    kept = new != -100
    kept[:, 0] = False
    assert not (kept & ~targets).any()  # never unmasks the prompt or the padding
    assert torch.equal(new[kept], batch["labels"][kept])  # kept labels are unchanged
    for i in range(4):
        n = int(targets[i].sum())
        assert int(kept[i].sum()) == max(1, int(fraction * n + 0.5))
    assert torch.equal(new[:, 0], batch["labels"][:, 0])  # the first label is left as it was


def test_random_is_seeded():
    batch = _batch()
    a = token_mask(None, batch, method="random", fraction=0.5, seed=1)
    assert torch.equal(a, token_mask(None, batch, method="random", fraction=0.5, seed=1))
    assert not torch.equal(a, token_mask(None, batch, method="random", fraction=0.5, seed=2))


def test_excess_loss_keeps_the_tokens_with_the_largest_loss_difference():
    batch = _batch(1)
    model, ref = tiny_llama(0), tiny_llama(1)
    new = token_mask(model, batch, method="excess_loss", fraction=0.5, reference=ref)
    excess = _naive_token_losses(model, batch) - _naive_token_losses(ref, batch)
    targets = _targets(batch)
    for i in range(4):
        pos = targets[i].nonzero().flatten()
        k = max(1, int(0.5 * len(pos) + 0.5))
        best = pos[torch.topk(excess[i, pos], k).indices]
        kept = (new[i] != -100).nonzero().flatten()
        assert set(kept.tolist()) - {0} == set(best.tolist())


def test_the_base_is_a_free_reference_through_a_delta():
    from surgical import Delta, applied

    base = tiny_llama(0)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "mlp" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    delta = Delta.from_models(base, tuned, density=1.0)
    batch = _batch(2)

    def tuned_logits(b):
        with applied(base, delta):
            return base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    state = {k: v.clone() for k, v in base.state_dict().items()}
    free = token_mask(tuned_logits, batch, fraction=0.4, reference=base)
    two_copies = token_mask(tuned, batch, fraction=0.4, reference=tiny_llama(0))
    assert torch.equal(free, two_copies)
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())  # the delta is off again


def test_precomputed_reference_losses_select_what_the_reference_model_does():
    """A reference given by its losses, computed once, keeps the same tokens as the reference
    model run at every batch; batches are found by content (a copy, in another order), and a batch
    it never saw is refused in one line."""
    model, ref = tiny_llama(0), tiny_llama(1)
    batches = [_batch(s) for s in range(3)]
    losses = ReferenceLosses.compute(ref, batches)
    assert len(losses) == 3
    for b in reversed(batches):
        copied = {k: v.clone() for k, v in b.items()}
        assert torch.equal(
            token_mask(model, copied, fraction=0.5, reference=losses),
            token_mask(model, b, fraction=0.5, reference=ref),
        )
    other = _batch(7)
    with pytest.raises(SurgicalError, match="reference's losses were not computed for this batch"):
        token_mask(model, other, fraction=0.5, reference=losses)
    # the key is the content: the same ids with other labels are another batch
    relabeled = {**batches[0], "labels": torch.where(_targets(batches[0]), -100, batches[0]["labels"])}
    assert ReferenceLosses.key(relabeled) != ReferenceLosses.key(batches[0])


def test_padding_that_carries_labels_is_not_trained():
    batch = _batch()
    batch["labels"] = batch["input_ids"].clone()  # labels on the padding too (a careless batch)
    new = token_mask(None, batch, method="random", fraction=1.0)
    assert (new[batch["attention_mask"] == 0] == -100).all()


def test_keep_top_breaks_ties_to_the_earlier_position():
    targets = torch.tensor([[False, True, True, True, True]])
    kept = keep_top(torch.zeros(1, 5), targets, 0.5)
    assert kept.tolist() == [[False, True, True, False, False]]


def test_report_marks_kept_and_dropped_targets():
    class Tok:
        def decode(self, ids):
            return f"t{ids[0]}"

    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, -100, 7, 8, -100]]),
    }
    new = torch.tensor([[-100, -100, -100, 8, -100]])
    text = token_report(Tok(), batch, new)
    assert text.splitlines() == ["example 0: kept 1 of 2 target tokens", "  t5 t6 ~t7~ [t8]"]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"fraction": 0.0}, r"fraction must be in \(0, 1\]"),
        ({"fraction": 1.2}, r"fraction must be in \(0, 1\]"),
        ({"method": "nope"}, "unknown token criterion 'nope'. Use one of: excess_loss, random"),
        ({"method": "random", "nope": 1}, r"unknown option\(s\) nope for token criterion 'random'"),
        ({"reference": None}, "needs a reference"),
        ({"model": None}, "needs a model"),
        ({"batch": {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.tensor([0, 1])}},
         "labels shaped like input_ids"),
        ({"batch": {"input_ids": torch.ones(2, 3, dtype=torch.long)}}, "with input_ids and labels"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_errors(kw, message):
    args = {"model": tiny_llama(0), "batch": _batch(), "reference": tiny_llama(1), **kw}
    with pytest.raises(SurgicalError, match=message) as e:
        token_mask(args.pop("model"), args.pop("batch"), **args)
    assert "\n" not in str(e.value)


def test_a_classifier_is_refused():
    from conftest import tiny_bert

    batch = _batch()
    with pytest.raises(SurgicalError, match="needs causal-LM logits"):
        token_mask(tiny_bert(), batch, reference=tiny_bert(1))


def test_every_token_criterion_is_registered_with_help():
    assert TOKEN_CRITERIA.names() == ["excess_loss", "random"]
    assert all(e.help for e in TOKEN_CRITERIA.entries())
