"""OnlineSelector: exactly the fraction of every batch, by loss, reducible loss and diversity,
against naive per-example computations; the model is left as it was; bad settings."""

from __future__ import annotations

import pytest
import torch

from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama
from surgical.core.errors import SurgicalError
from surgical.data.online import OnlineSelector


def _losses(model, batch):
    with torch.no_grad():
        return torch.tensor(
            [
                float(model(**{k: v[i : i + 1] for k, v in batch.items()}).loss)
                for i in range(len(batch["labels"]))
            ]
        )


@pytest.mark.parametrize("fraction, want", [(0.01, 1), (0.25, 2), (0.3, 2), (0.5, 4), (0.7, 6), (1.0, 8)])
@pytest.mark.parametrize("diversity", [0.0, 1.0])
def test_keeps_exactly_the_fraction(fraction, want, diversity):
    model = tiny_bert()
    batch = cls_batches(n=1, batch=8)[0]
    sel = OnlineSelector(fraction, diversity=diversity)
    sub = sel(model, batch)
    assert all(v.shape[0] == want for v in sub.values())
    assert sel.seen == 8 and sel.kept == want


@pytest.mark.parametrize("make, batches", [(tiny_bert, cls_batches), (tiny_llama, lm_batches)])
def test_loss_keeps_the_hardest_examples(make, batches):
    model = make()
    batch = batches(n=1, batch=8)[0]
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    idx = OnlineSelector(0.5).select(model, batch)
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.eval()
    naive = _losses(model, batch)
    assert idx.tolist() == sorted(torch.topk(naive, 4).indices.tolist())
    sub = OnlineSelector(0.5)(model, batch)
    assert torch.equal(sub["input_ids"], batch["input_ids"][idx])
    assert torch.equal(sub["labels"], batch["labels"][idx])


def test_reducible_loss_subtracts_the_reference():
    model, ref = tiny_bert(0), tiny_bert(1)
    batch = cls_batches(n=1, batch=8, seed=4)[0]
    naive = _losses(model, batch) - _losses(ref, batch)
    idx = OnlineSelector(0.375, utility="reducible", reference=ref).select(model, batch)
    assert idx.tolist() == sorted(torch.topk(naive, 3).indices.tolist())

    def ref_logits(b):
        return ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    assert torch.equal(
        OnlineSelector(0.375, utility="reducible", reference=ref_logits).select(model, batch), idx
    )


def test_diversity_passes_over_copies_of_a_pick():
    model = tiny_bert()
    batch = cls_batches(n=1, batch=8)[0]
    hardest = int(torch.argmax(_losses(model, batch)))
    for i in [j for j in range(8) if j != hardest][:2]:  # three copies of the hardest example
        batch["input_ids"][i] = batch["input_ids"][hardest]
        batch["labels"][i] = batch["labels"][hardest]
    copies = {j for j in range(8) if torch.equal(batch["input_ids"][j], batch["input_ids"][hardest])}
    assert len(copies) == 3
    plain = OnlineSelector(0.375).select(model, batch)
    assert set(plain.tolist()) == copies  # by loss alone, the three copies
    diverse = OnlineSelector(0.375, diversity=10.0).select(model, batch)
    assert len(set(diverse.tolist()) & copies) == 1


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"fraction": 0.0}, r"fraction must be in \(0, 1\]"),
        ({"fraction": 2.0}, r"fraction must be in \(0, 1\]"),
        ({"fraction": 0.5, "utility": "nope"}, "unknown utility 'nope'. Use one of: loss, reducible"),
        ({"fraction": 0.5, "utility": "reducible"}, "needs a reference"),
        ({"fraction": 0.5, "diversity": -1.0}, "diversity must be >= 0"),
    ],
)
def test_bad_settings_are_one_line_errors(kw, message):
    with pytest.raises(SurgicalError, match=message) as e:
        OnlineSelector(**kw)
    assert "\n" not in str(e.value)


def test_a_batch_without_labels_is_refused():
    with pytest.raises(SurgicalError, match="needs dict batches with input_ids and labels"):
        OnlineSelector(0.5)(tiny_bert(), {"input_ids": torch.ones(2, 3, dtype=torch.long)})
