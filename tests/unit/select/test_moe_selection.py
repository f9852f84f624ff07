"""Selection beyond nn.Linear: default targets (Conv1D, convolutions, fused experts), every
criterion on them, ``channel`` and ``expert`` granularity, and a planted expert."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM

import surgical as sg
from conftest import lm_batches
from surgical.core.errors import SurgicalError
from surgical.recipes.config import SelectionConfig
from surgical.select.api import default_targets, resolve_targets
from surgical.select.experts import esft_plan, expert_routing, is_expert_parameter, listed_expert
from surgical.select.units import GRANULARITIES, build_units

EXPERTS = 4


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def tiny_mixtral(seed: int = 0, top_k: int = 2) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=top_k,
        max_position_embeddings=64, router_jitter_noise=0.0,
    )  # fmt: skip
    return MixtralForCausalLM(cfg).eval()


class Expert(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class ListMoE(nn.Module):
    """Top-1 routing over ``layers.N.experts`` (a ModuleList of expert MLPs)."""

    def __init__(self, seed: int = 0, vocab: int = 100, dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.routers = nn.ModuleList([nn.Linear(dim, EXPERTS) for _ in range(2)])
        self.layers = nn.ModuleList([nn.Module() for _ in range(2)])
        for layer in self.layers:
            layer.experts = nn.ModuleList([Expert(dim) for _ in range(EXPERTS)])
        self.out = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        x = self.embed(input_ids)
        for router, layer in zip(self.routers, self.layers, strict=True):
            top, which = torch.softmax(router(x), -1).max(-1)
            out = torch.zeros_like(x)
            for e, expert in enumerate(layer.experts):
                hit = which == e
                if hit.any():
                    out[hit] = expert(x[hit]) * top[hit, None]
            x = x + out
        logits = self.out(x)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return {"loss": loss, "logits": logits}


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv1d = nn.Conv1d(4, 6, 3)
        self.conv3d = nn.Conv3d(1, 2, 1)
        self.head = nn.Linear(6, 3)


def test_default_targets_cover_conv1d_convolutions_and_fused_experts():
    gpt2 = default_targets(tiny_gpt2())
    assert len(gpt2) == 8 and all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in gpt2)
    mixtral = default_targets(tiny_mixtral())
    for i in range(2):
        assert f"model.layers.{i}.mlp.experts.gate_up_proj" in mixtral
        assert f"model.layers.{i}.mlp.experts.down_proj" in mixtral
        assert f"model.layers.{i}.self_attn.q_proj.weight" in mixtral
    assert not any("embed" in n or "norm" in n or "lm_head" in n or "mlp.gate." in n for n in mixtral)
    assert default_targets(TinyCNN()) == ["conv.weight", "conv1d.weight", "conv3d.weight", "head.weight"]


def test_targets_may_name_any_weight_of_two_or_more_dims_but_not_embeddings():
    model = tiny_mixtral()
    params, _ = resolve_targets(model, ["*.mlp.gate.weight"], None, None)  # the routers
    assert list(params) == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]
    with pytest.raises(SurgicalError, match="matches no nn.Linear weight"):
        resolve_targets(model, ["*embed_tokens*"], None, None)
    with pytest.raises(SurgicalError, match="matches no nn.Linear weight"):
        resolve_targets(model, ["*layernorm*"], None, None)


@pytest.mark.parametrize("method", sg.CRITERIA.names())
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_mixtral], ids=["gpt2", "mixtral"])
def test_every_criterion_selects_among_conv1d_and_fused_experts(method, make):
    model = make()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    whole = sg.CRITERIA.entry(method).extra.get("granularity")  # rgn: tensors, fim_layer: layers
    density, allocation = (0.6, "global") if whole else (0.1, "per_tensor")
    plan = sg.select(
        model,
        lm_batches(n=2),
        method=method,
        density=density,
        allocation=allocation,
        max_batches=2,
        progress=False,
    )
    chosen = [*plan.sparse_names, *plan.dense]
    if make is tiny_mixtral and method not in ("rgn", "fim_layer"):
        assert any(n.endswith(("gate_up_proj", "down_proj")) for n in plan.entries)
    if make is tiny_gpt2:
        assert chosen and all(".c_" in n for n in chosen)
    for n, p in model.named_parameters():  # scoring leaves the model as it was
        assert torch.equal(p, before[n]), n


def test_channel_granularity_is_output_channels():
    model = TinyCNN()
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(model.get_parameter(n).shape, generator=g) for n in default_targets(model)}
    units = {u.name: u for u in build_units(scores, "channel")}
    assert units["conv.weight"].kind == "rows" and units["conv.weight"].size == 9
    torch.testing.assert_close(units["conv.weight"].scores, scores["conv.weight"].double().sum((1, 2, 3)))
    assert units["conv3d.weight"].scores.shape == (2,)
    assert units["head.weight"].kind == "rows" and units["head.weight"].size == 6
    gpt2 = tiny_gpt2()
    name = "transformer.h.0.attn.c_attn.weight"  # a Conv1D weight is (in, out)
    s = torch.rand(32, 96, generator=g)
    (u,) = build_units({name: s}, "channel", transposed={name})
    assert u.kind == "cols" and u.scores.shape == (96,) and u.size == 32
    plan = sg.select(
        gpt2, lm_batches(n=2), method="gradient", density=0.1, granularity="channel", progress=False
    )
    assert plan.cols and not plan.rows and not plan.entries
    assert "channel" in GRANULARITIES and "expert" in GRANULARITIES


def test_row_granularity_takes_rows_of_any_weight_of_two_or_more_dims():
    s = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    (u,) = build_units({"w": s}, "row", aggregate="mean")
    assert u.kind == "rows" and u.size == 12
    torch.testing.assert_close(u.scores, s.double().reshape(2, -1).mean(1))
    with pytest.raises(SurgicalError, match="2\\+ dimensions"):
        build_units({"b": torch.ones(3)}, "row")


def test_expert_units_group_the_fused_tensors_of_one_experts_module():
    model = tiny_mixtral()
    names = [n for n in default_targets(model) if is_expert_parameter(n, model.get_parameter(n).shape)]
    assert len(names) == 4
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(model.get_parameter(n).shape, generator=g) for n in names}
    units = build_units(scores, "expert")
    assert [u.name for u in units] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    u = units[0]
    gu, down = u.members
    assert u.kind == "rows" and u.size == 96 * 32 + 32 * 48 and u.group == "model.layers.0"
    want = scores[gu].double().sum((1, 2)) + scores[down].double().sum((1, 2))
    torch.testing.assert_close(u.scores, want)
    with pytest.raises(SurgicalError, match="belongs to no expert"):
        build_units({"model.layers.0.self_attn.q_proj.weight": torch.ones(2, 2)}, "expert")
    assert listed_expert("model.layers.3.mlp.experts.7.up.weight") == "model.layers.3.mlp.experts.7"
    assert listed_expert("model.layers.3.mlp.experts.gate_up_proj") is None


def _plant_mixtral(expert: int) -> MixtralForCausalLM:
    """Top-1 routing where every token of every layer goes to ``expert``: hidden coordinate 0 is
    large and positive (the embeddings' column 0), and only the planted expert's router row reads it."""
    model = tiny_mixtral(top_k=1)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[expert, 0] = 10.0
    return model


@pytest.mark.parametrize("method", ["gradient", "fisher", "salience"])
def test_expert_granularity_picks_the_planted_fused_expert(method):
    planted = 2
    model = _plant_mixtral(planted)
    seen = []
    handles = [
        layer.mlp.gate.register_forward_hook(lambda m, i, o: seen.append(o[2]))
        for layer in model.model.layers
    ]
    model(**lm_batches(n=1)[0])
    for h in handles:
        h.remove()
    assert all(bool((s == planted).all()) for s in seen)  # the plant: every token to one expert
    one_expert = 96 * 32 + 32 * 48
    for allocation in ("global", "per_layer"):
        plan = sg.select(model, lm_batches(n=2), method=method, granularity="expert", count=2 * one_expert,
                         allocation=allocation, progress=False)  # fmt: skip
        assert len(plan.rows) == 4 and not plan.entries and not plan.dense
        assert all(r.tolist() == [planted] for r in plan.rows.values())
        assert plan.meta["selected"] == 2 * one_expert


def test_expert_granularity_picks_the_planted_listed_expert():
    planted = 1
    model = ListMoE()
    with torch.no_grad():
        for router in model.routers:
            router.bias.zero_()
            router.bias[planted] = 100.0
    expert_size = sum(p.numel() for p in model.layers[0].experts[0].parameters() if p.dim() == 2)
    plan = sg.select(model, lm_batches(n=2), method="gradient", granularity="expert", count=2 * expert_size,
                     progress=False)  # fmt: skip
    assert sorted(plan.dense) == sorted(
        f"layers.{i}.experts.{planted}.{m}.weight" for i in range(2) for m in ("up", "down")
    )


def test_expert_granularity_needs_experts():
    with pytest.raises(SurgicalError, match="expert granularity found no expert parameter"):
        sg.select(tiny_gpt2(), lm_batches(n=1), method="magnitude", granularity="expert", density=0.1)


def test_the_selection_config_accepts_the_new_granularities():
    for g in ("channel", "expert"):
        assert SelectionConfig(granularity=g).granularity == g


# ---------------------------------------------------------------------------- ESFT


def test_esft_picks_the_planted_fused_expert_and_trains_only_its_rows():
    planted = 3
    model = _plant_mixtral(planted)
    routing = expert_routing(model, lm_batches(n=2))
    assert set(routing) == {f"model.layers.{i}.mlp.experts" for i in range(2)}
    for shares in routing.values():
        want = torch.zeros(EXPERTS, dtype=torch.float64)
        want[planted] = 1.0
        assert torch.equal(shares["token"], want) and torch.equal(shares["gate"], want)
    for score in ("gate", "token"):
        plan = esft_plan(model, lm_batches(n=2), score=score, share=0.2)
        assert len(plan.rows) == 4 and not plan.dense and not plan.entries
        assert all(r.tolist() == [planted] for r in plan.rows.values())
        assert plan.meta["method"] == f"esft_{score}" and plan.meta["selected"] == 2 * (96 * 32 + 32 * 48)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    sg.prepare(model, plan)
    sg.fit(model, lm_batches(n=2), max_steps=2, lr=1e-2, show=False)
    sg.unprepare(model)
    for n, p in model.named_parameters():
        changed = (p != base[n]).reshape(p.shape[0], -1).any(1) if p.dim() == 3 else (p != base[n]).any()
        if n in plan.rows:
            assert changed.nonzero().flatten().tolist() == [planted], n
        else:
            assert not bool(changed.any()), n


def test_esft_takes_experts_until_the_cumulative_share_is_reached():
    model = tiny_mixtral(top_k=2)
    batches = lm_batches(n=2)
    picks = {}

    def hook(name):
        return lambda m, i, out: picks.setdefault(name, []).append(out[2].reshape(-1))

    handles = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    routing = expert_routing(model, batches)
    for i in range(2):  # token shares from the router's own choices
        counts = torch.bincount(torch.cat(picks[i]), minlength=EXPERTS).double()
        torch.testing.assert_close(routing[f"model.layers.{i}.mlp.experts"]["token"], counts / counts.sum())
    plan = esft_plan(model, batches, score="token", share=0.5)
    for i in range(2):
        shares = routing[f"model.layers.{i}.mlp.experts"]["token"]
        chosen = plan.rows[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        assert torch.equal(chosen, plan.rows[f"model.layers.{i}.mlp.experts.down_proj"])
        total = float(shares[chosen].sum())
        assert total >= 0.5 - 1e-12
        assert total - float(shares[chosen].min()) < 0.5  # the smallest chosen one was needed
        assert float(shares[chosen].min()) >= float(
            shares[[e for e in range(EXPERTS) if e not in chosen]].max()
        )


def test_esft_on_a_modulelist_of_experts_with_named_routers():
    planted = 2
    model = ListMoE()
    with torch.no_grad():
        for router in model.routers:
            router.bias.zero_()
            router.bias[planted] = 100.0
    routers = {f"layers.{i}.experts": f"routers.{i}" for i in range(2)}
    with pytest.raises(SurgicalError, match="found no router beside"):
        esft_plan(model, lm_batches(n=1))
    plan = esft_plan(model, lm_batches(n=1), score="token", share=0.9, routers=routers)
    want = [
        f"layers.{i}.experts.{planted}.{m}.{p}"
        for i in range(2)
        for m in ("up", "down")
        for p in ("weight", "bias")
    ]
    assert sorted(plan.dense) == sorted(want) and not plan.rows


def test_esft_bad_input():
    with pytest.raises(SurgicalError, match="no experts module"):
        expert_routing(tiny_gpt2(), lm_batches(n=1))
    with pytest.raises(SurgicalError, match="unknown ESFT score"):
        esft_plan(tiny_mixtral(), lm_batches(n=1), score="nope")
    with pytest.raises(SurgicalError, match="share must be in"):
        esft_plan(tiny_mixtral(), lm_batches(n=1), share=0.0)
