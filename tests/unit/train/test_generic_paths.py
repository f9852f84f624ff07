"""The generic path (any floating parameter: GPT-2's Conv1D, convolutions, fused MoE experts):
gradients, the floor (no persistent dense .grad, optimizer state for the deltas only), the
round trip select -> prepare -> fit -> extract -> save -> load -> apply, and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MixtralConfig,
    MixtralForCausalLM,
    ResNetConfig,
    ResNetForImageClassification,
)

import surgical as sg
from conftest import lm_batches
from surgical.core.errors import SurgicalError
from surgical.select.plan import Plan
from surgical.train.conv1d import Conv1DEntryState
from surgical.train.generic import GenericBlockState, GenericEntryState, attach_generic
from surgical.train.hooks import TrainHook
from surgical.train.schedules import Regrow
from surgical.train.state import state_of, states_of

# ---------------------------------------------------------------------------- tiny models


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
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=top_k, max_position_embeddings=64,
        router_jitter_noise=0.0,
    )  # fmt: skip
    return MixtralForCausalLM(cfg).eval()


def tiny_resnet(seed: int = 0) -> ResNetForImageClassification:
    torch.manual_seed(seed)
    cfg = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=3,
    )
    return ResNetForImageClassification(cfg).eval()


class TinyCNN(nn.Module):
    """Conv2d over 8x8 images, then Conv1d over the image rows, then a Linear head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv2d = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1d = nn.Conv1d(32, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, pixel_values, labels=None):
        x = torch.relu(self.conv2d(pixel_values))  # (B, 4, 8, 8)
        x = torch.relu(self.conv1d(x.flatten(1, 2)))  # channels x rows as channels: (B, 8, 8)
        logits = self.head(x.mean(-1))
        return {"loss": F.cross_entropy(logits, labels) if labels is not None else None, "logits": logits}


class Expert(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class ListMoELayer(nn.Module):
    """Top-1 routing over a ModuleList of expert MLPs."""

    def __init__(self, dim: int, experts: int) -> None:
        super().__init__()
        self.router = nn.Linear(dim, experts)
        self.experts = nn.ModuleList([Expert(dim, 2 * dim) for _ in range(experts)])

    def forward(self, x):
        probs = torch.softmax(self.router(x), -1)
        top, which = probs.max(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            hit = which == e
            if hit.any():
                out[hit] = expert(x[hit]) * top[hit, None]
        return x + out


class ListMoE(nn.Module):
    """A causal-LM-shaped model whose experts are a ModuleList (``layers.N.experts.E.up``)."""

    def __init__(self, seed: int = 0, experts: int = 4, vocab: int = 100, dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([ListMoELayer(dim, experts) for _ in range(2)])
        self.out = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.out(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return {"loss": loss, "logits": logits}


def image_batches(
    n: int = 3, batch: int = 6, channels: int = 1, size: int = 8, classes: int = 3, seed: int = 1
):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(batch, channels, size, size, generator=g),
            "labels": torch.randint(0, classes, (batch,), generator=g),
        }
        for _ in range(n)
    ]


# ---------------------------------------------------------------------------- helpers


def _plan(model, entries=None, rows=None, cols=None, dense=()):
    entries, rows, cols = entries or {}, rows or {}, cols or {}
    shapes = {n: tuple(model.get_parameter(n).shape) for n in [*entries, *rows, *cols, *dense]}
    return Plan(
        entries=entries, rows=rows, cols=cols, dense=list(dense), shapes=shapes, meta={"method": "manual"}
    )


def _selected_mask(plan: Plan, name: str, shape) -> torch.Tensor:
    """Flat boolean mask of every value of ``name`` the plan selects."""
    mask = torch.zeros(shape, dtype=torch.bool)
    if name in plan.entries:
        mask.view(-1)[plan.entries[name]] = True
    elif name in plan.rows:
        mask[plan.rows[name]] = True
    elif name in plan.cols:
        mask[:, plan.cols[name]] = True
    elif name in plan.dense:
        mask[...] = True
    return mask.reshape(-1)


def _delta_name(name: str) -> str:
    return f"{name}_sg_delta"


def _dense_grads(model, names, batch):
    """The dense gradients of ``names`` for one batch, on a copy of ``model``."""
    dense = copy.deepcopy(model)
    for n, p in dense.named_parameters():
        p.requires_grad_(n in names)
    out = dense(**batch)
    loss = out["loss"] if isinstance(out, dict) else out.loss
    loss.backward()
    return {n: dense.get_parameter(n).grad for n in names}


class FloorSpy(TrainHook):
    """After every optimizer step: no parameter but the trainable ones holds a gradient, and the
    optimizer holds state only for the trainable values (each state tensor their size)."""

    def __init__(self, trainable: dict[str, torch.Tensor]) -> None:
        self.trainable = trainable
        self.steps = 0

    def on_step_end(self, state):
        ids = {id(p) for p in self.trainable.values()}
        for name, p in state.model.named_parameters():
            if id(p) not in ids:
                assert p.grad is None, f"{name} holds a gradient"
        held = 0
        for p, st in state.optimizer.state.items():
            assert id(p) in ids
            for v in st.values():
                if torch.is_tensor(v) and v.dim():
                    assert v.shape == p.shape
            held += st["exp_avg"].numel()
        assert held == sum(p.numel() for p in self.trainable.values())
        self.steps += 1


def roundtrip(model, batches, tmp_path, plan, steps=3, lr=1e-2):
    """prepare -> fit -> extract -> save -> load -> apply onto a fresh base, checking the floor and
    that values outside the plan stay bit-identical; returns (trained model, fresh model)."""
    base = copy.deepcopy(model)
    sg.prepare(model, plan)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {*(_delta_name(n) for n in plan.sparse_names), *plan.dense}
    assert sg.trainable_count(model) == sum(p.numel() for p in trainable.values())
    spy = FloorSpy(trainable)
    result = sg.fit(model, batches, max_steps=steps, lr=lr, hooks=[spy], show=False)
    assert spy.steps == steps and result.steps == steps
    sg.sync(model)
    base_p = dict(base.named_parameters())
    moved = 0
    for name, p in model.named_parameters():
        if name.endswith("_sg_delta"):
            continue
        changed = (base_p[name].detach().reshape(-1) != p.detach().reshape(-1)).nonzero().flatten()
        allowed = _selected_mask(plan, name, p.shape)
        assert bool(allowed[changed].all()), f"{name}: a frozen value changed"
        moved += changed.numel()
    assert moved > 0
    delta = sg.extract(model)
    delta.save(tmp_path / "delta")
    fresh = sg.apply(copy.deepcopy(base), sg.Delta.load(tmp_path / "delta"))
    trained = dict(model.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, trained[name]), name
    sg.unprepare(model)
    assert not any(states_of(m) for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())
    for name, p in fresh.named_parameters():
        assert torch.equal(p, model.get_parameter(name)), name
    return model, fresh


def _outputs_equal(a, b, batch):
    a.load_state_dict(b.state_dict())  # buffers (BatchNorm statistics) are not part of a delta
    with torch.no_grad():
        oa, ob = a(**batch), b(**batch)
    la = oa["logits"] if isinstance(oa, dict) else oa.logits
    lb = ob["logits"] if isinstance(ob, dict) else ob.logits
    assert torch.equal(la, lb)


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", ["entries", "rows", "cols"])
def test_conv1d_gpt2_gradients_equal_dense_gradient_gathered(kind):
    model = tiny_gpt2()
    batch = lm_batches(n=1)[0]
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"]
    want = _dense_grads(model, names, batch)
    sel = {n: torch.tensor([0, 5, 17, 30]) for n in names}
    if kind == "entries":
        sel = {n: torch.tensor([0, 7, 100, 1000, 2047]) for n in names}
    sg.prepare(model, _plan(model, **{kind: sel}))
    model(**batch).loss.backward()
    for n in names:
        module = model.get_submodule(n.rpartition(".")[0])
        got = module.weight_sg_delta.grad
        if kind == "entries":
            expect = want[n].reshape(-1)[sel[n]]
        elif kind == "rows":
            expect = want[n][sel[n]]
        else:
            expect = want[n][:, sel[n]]
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-7)
        assert module.weight.grad is None and not module.weight.requires_grad


@pytest.mark.parametrize("count", [5, 2000])  # the sampled product, and the dense product gathered
def test_conv1d_entries_take_the_sampled_path_and_match_the_generic_one(count):
    model = tiny_gpt2()
    batch = lm_batches(n=1)[0]
    name = "transformer.h.0.mlp.c_fc.weight"  # (32, 128)
    idx = torch.randperm(32 * 128, generator=torch.Generator().manual_seed(0))[:count].sort().values
    want = _dense_grads(model, [name], batch)[name].reshape(-1)[idx]
    generic = copy.deepcopy(model)
    sg.prepare(model, _plan(model, entries={name: idx}))
    module = model.get_submodule(name.rpartition(".")[0])
    assert isinstance(state_of(module), Conv1DEntryState)
    model(**batch).loss.backward()
    torch.testing.assert_close(module.weight_sg_delta.grad, want, rtol=1e-5, atol=1e-7)
    assert (state_of(module).pattern is not None) == (count == 5)
    gmod = generic.get_submodule(name.rpartition(".")[0])
    for p in generic.parameters():
        p.requires_grad_(False)
    attach_generic(gmod, "weight", "entries", idx)  # the generic path on the same weight
    generic(**batch).loss.backward()
    torch.testing.assert_close(gmod.weight_sg_delta.grad, want, rtol=1e-5, atol=1e-7)


def test_regrow_on_conv1d_entries_accumulates_in_the_weight_layout():
    model = tiny_gpt2()
    batches = lm_batches(n=4)
    name = "transformer.h.1.attn.c_proj.weight"
    plan = _plan(model, entries={name: torch.arange(0, 1024, 8)})
    base = copy.deepcopy(model)
    sg.prepare(model, plan)
    regrow = Regrow(every=2, fraction=0.5)
    sg.fit(model, batches, max_steps=4, lr=1e-2, hooks=[regrow], show=False)
    assert regrow.changes > 0
    delta = sg.extract(model)
    fresh = sg.apply(copy.deepcopy(base), delta)
    sg.unprepare(model)
    assert torch.equal(fresh.get_parameter(name), model.get_parameter(name))


def test_conv2d_conv1d_conv3d_gradients_equal_dense_gradient_gathered():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.Flatten(1, 2), nn.Conv2d(12, 4, 3), nn.Flatten(2))
    model.append(nn.Conv1d(4, 2, 3))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return {"loss": self.net(x).square().mean()}

    wrap = Wrap()
    batch = {"x": torch.randn(2, 2, 4, 6, 6)}
    names = ["net.0.weight", "net.2.weight", "net.4.weight"]
    want = _dense_grads(wrap, names, batch)
    entries = {"net.0.weight": torch.tensor([1, 40, 161]), "net.4.weight": torch.tensor([0, 23])}
    rows = {"net.2.weight": torch.tensor([1, 3])}  # output channels
    sg.prepare(wrap, _plan(wrap, entries=entries, rows=rows))
    wrap(**batch)["loss"].backward()
    for n, idx in entries.items():
        got = wrap.get_parameter(_delta_name(n)).grad
        torch.testing.assert_close(got, want[n].reshape(-1)[idx], rtol=1e-5, atol=1e-6)
    got = wrap.get_parameter("net.2.weight_sg_delta").grad
    assert got.shape == (2, 12, 3, 3)
    torch.testing.assert_close(got, want["net.2.weight"][rows["net.2.weight"]], rtol=1e-5, atol=1e-6)


def test_fused_expert_entries_and_rows_get_the_dense_gradient_gathered():
    model = tiny_mixtral()
    batch = lm_batches(n=1)[0]
    gu, down = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"
    want = _dense_grads(model, [gu, down], batch)
    entries = {gu: torch.tensor([3, 999, 4000, 6143])}
    rows = {down: torch.tensor([1, 2])}  # two whole experts of the down projection
    sg.prepare(model, _plan(model, entries=entries, rows=rows))
    experts = model.get_submodule("model.layers.0.mlp.experts")
    assert set(states_of(experts)) == {"gate_up_proj", "down_proj"}  # one module, two states
    assert isinstance(state_of(experts, "gate_up_proj"), GenericEntryState)
    assert isinstance(state_of(experts, "down_proj"), GenericBlockState)
    model(**batch).loss.backward()
    torch.testing.assert_close(experts.gate_up_proj_sg_delta.grad, want[gu].reshape(-1)[entries[gu]])
    torch.testing.assert_close(experts.down_proj_sg_delta.grad, want[down][rows[down]])
    assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"{gu}_sg_delta", f"{down}_sg_delta"}  # what an optimizer or the Trainer sees


def test_no_grad_forward_and_gradient_checkpointing_agree():
    model = tiny_gpt2()
    batches = lm_batches(n=2)
    name = "transformer.h.1.attn.c_attn.weight"
    plan = _plan(model, entries={name: torch.arange(0, 3072, 7)})
    ckpt = copy.deepcopy(model)
    sg.prepare(model, plan)
    sg.prepare(ckpt, plan)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    model.train()
    model(**batches[0]).loss.backward()
    ckpt(**batches[0]).loss.backward()
    a = model.get_parameter(_delta_name(name)).grad
    b = ckpt.get_parameter(_delta_name(name)).grad
    torch.testing.assert_close(a, b)
    with torch.no_grad():  # no substitution, same logits
        model.eval()
        torch.testing.assert_close(model(**batches[1]).logits, tiny_gpt2()(**batches[1]).logits)


# ---------------------------------------------------------------------------- round trips


def test_gpt2_conv1d_roundtrip(tmp_path):
    model = tiny_gpt2()
    batches = lm_batches(n=3)
    plan = sg.select(model, batches, method="gradient", density=0.05, progress=False)
    assert plan.entries and all(".attn.c_" in n or ".mlp.c_" in n for n in plan.entries)
    trained, fresh = roundtrip(model, batches, tmp_path, plan)
    _outputs_equal(trained, fresh, batches[0])


def test_gpt2_channel_granularity_selects_conv1d_columns(tmp_path):
    model = tiny_gpt2()
    batches = lm_batches(n=3)
    plan = sg.select(model, batches, method="fisher", density=0.05, granularity="channel", progress=False)
    assert plan.cols and not plan.rows  # Conv1D weights are (in, out): output channels are columns
    roundtrip(model, batches, tmp_path, plan)


@pytest.mark.parametrize("granularity", ["entry", "channel"])
def test_plain_cnn_roundtrip(tmp_path, granularity):
    model = TinyCNN()
    batches = image_batches()
    plan = sg.select(
        model,
        batches,
        method="gradient",
        density=0.2,
        granularity=granularity,
        allocation="per_tensor",
        progress=False,
    )
    assert {"conv2d.weight", "conv1d.weight"} <= set(plan.sparse_names)
    if granularity == "channel":
        assert set(plan.rows) == set(plan.sparse_names)
    trained, fresh = roundtrip(model, batches, tmp_path, plan)
    _outputs_equal(trained, fresh, batches[0])


def test_resnet_roundtrip(tmp_path):
    model = tiny_resnet()
    batches = image_batches(channels=3, size=16)
    plan = sg.select(model, batches, method="gradient", density=0.05, always=["classifier.*"], progress=False)
    convs = [n for n in plan.sparse_names if n.endswith("convolution.weight")]
    assert convs and all(n in plan.entries for n in convs)
    trained, fresh = roundtrip(model, batches, tmp_path, plan)
    _outputs_equal(trained, fresh, batches[0])


def test_mixtral_fused_experts_roundtrip(tmp_path):
    model = tiny_mixtral()
    batches = lm_batches(n=3)
    plan = sg.select(model, batches, method="gradient", density=0.02, allocation="per_tensor", progress=False)
    fused = [n for n in plan.entries if n.endswith(("gate_up_proj", "down_proj"))]
    assert len(fused) == 4  # the experts are selectable: entries of the fused tensors
    trained, fresh = roundtrip(model, batches, tmp_path, plan)
    _outputs_equal(trained, fresh, batches[0])


def test_mixtral_expert_granularity_roundtrip_trains_whole_experts(tmp_path):
    model = tiny_mixtral()
    batches = lm_batches(n=3)
    plan = sg.select(model, batches, method="gradient", density=0.3, granularity="expert", progress=False)
    assert plan.rows and not plan.entries
    for name, rows in plan.rows.items():
        assert name.endswith(("gate_up_proj", "down_proj"))
        other = (
            name.replace("gate_up_proj", "X").replace("down_proj", "gate_up_proj").replace("X", "down_proj")
        )
        assert torch.equal(plan.rows[other], rows)  # an expert is its rows of both fused tensors
    roundtrip(model, batches, tmp_path, plan)


def test_modulelist_experts_roundtrip(tmp_path):
    model = ListMoE()
    batches = lm_batches(n=3)
    plan = sg.select(model, batches, method="gradient", density=0.3, granularity="expert", progress=False)
    assert plan.dense and all(".experts." in n for n in plan.dense)
    roundtrip(model, batches, tmp_path, plan)
    model = ListMoE()  # entries of listed experts' Linear weights go through the Linear path
    plan = sg.select(model, batches, method="gradient", density=0.05, progress=False)
    roundtrip(model, batches, tmp_path / "entries", plan)


def test_regrow_moves_entries_of_a_generic_tensor():
    model = TinyCNN()
    batches = image_batches(n=4)
    plan = _plan(model, entries={"conv2d.weight": torch.arange(0, 36, 3)})
    sg.prepare(model, plan)
    regrow = Regrow(every=2, fraction=0.5)
    sg.fit(model, batches, max_steps=2, lr=1e-2, hooks=[regrow], show=False)
    assert regrow.changes > 0
    st = state_of(model.conv2d)
    assert st.indices(model.conv2d).numel() == 12 and st.grad_acc is None
    delta = sg.extract(model)
    idx, _ = delta.entries["conv2d.weight"]
    assert not torch.equal(idx, torch.arange(0, 36, 3))


def test_checkpoint_resume_of_generic_states_gives_the_same_delta(tmp_path):
    batches = image_batches(n=4)

    def run(resume, stop_at=None):
        model = TinyCNN()
        entries, rows = {"conv2d.weight": torch.arange(0, 36, 2)}, {"conv1d.weight": torch.tensor([1, 4])}
        sg.prepare(model, _plan(model, entries=entries, rows=rows))
        steps = iter(range(1, 100))
        stop = (lambda: "enough" if next(steps) == stop_at else None) if stop_at else None
        where = tmp_path / ("b" if stop_at or resume else "a")
        result = sg.fit(model, batches, max_steps=4, lr=1e-2, checkpoint_dir=where, checkpoint_every=1,
                        resume=resume, stop=stop, show=False)  # fmt: skip
        assert result.resumed_from == (2 if resume else None)
        return sg.extract(model)

    whole = run(False)
    run(False, stop_at=2)  # stopped after 2 steps, checkpointed
    resumed = run(True)
    for name in whole.entries:
        assert torch.equal(whole.entries[name][0], resumed.entries[name][0])
        assert torch.equal(whole.entries[name][1], resumed.entries[name][1])
    for name in whole.rows:
        assert torch.equal(whole.rows[name][1], resumed.rows[name][1])


# ---------------------------------------------------------------------------- refusals


def _untouched(model, before):
    assert not any(states_of(m) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(4, 4))])
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * self.scales[0]


def test_refuses_what_cannot_be_intercepted_before_changing_anything():
    model = Holder()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    plan = _plan(model, entries={"scales.0": torch.tensor([1])})
    with pytest.raises(
        SurgicalError, match=r"entries of 'scales.0' cannot train sparsely: its module .*no forward"
    ):
        sg.prepare(model, plan)
    _untouched(model, before)
    # a parameter shared by two modules
    shared = nn.Sequential(nn.Conv1d(2, 2, 1), nn.Conv1d(2, 2, 1))
    shared[1].weight = shared[0].weight
    before = {n: p.requires_grad for n, p in shared.named_parameters()}
    with pytest.raises(SurgicalError, match="shared by 2 modules"):
        sg.prepare(shared, _plan(shared, entries={"0.weight": torch.tensor([0])}))
    _untouched(shared, before)
    # columns of a 4-D convolution weight
    cnn = TinyCNN()
    with pytest.raises(SurgicalError, match="columns need a 2-D parameter"):
        sg.prepare(cnn, _plan(cnn, cols={"conv2d.weight": torch.tensor([0])}))


class Symmetric(nn.Module):
    def forward(self, w):
        return (w + w.t()) / 2


def test_a_parametrized_weight_trains_through_its_parametrization():
    """The original tensor of a ``torch.nn.utils.parametrize`` parametrization is read by the
    parametrization's own forward, which the generic path intercepts."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(3, 3))
    torch.nn.utils.parametrize.register_parametrization(lin[0], "weight", Symmetric())
    name = "0.parametrizations.weight.original"
    x = torch.randn(5, 3)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = lin

        def forward(self, x):
            return {"loss": self.net(x).square().sum()}

    wrap = Wrap()
    want = _dense_grads(wrap, ["net." + name], {"x": x})["net." + name]
    idx = torch.tensor([1, 3, 5])
    sg.prepare(wrap, _plan(wrap, entries={"net." + name: idx}))
    wrap(x)["loss"].backward()
    torch.testing.assert_close(wrap.get_parameter(f"net.{name}_sg_delta").grad, want.reshape(-1)[idx])


def test_refuses_two_sparse_parameters_of_one_linear():
    model = TinyCNN()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    plan = _plan(model, entries={"head.weight": torch.tensor([0]), "head.bias": torch.tensor([1])})
    with pytest.raises(SurgicalError, match="only one parameter of an nn.Linear"):
        sg.prepare(model, plan)
    _untouched(model, before)


def test_embedding_entries_train_generically_unless_max_norm():
    model = ListMoE()
    batches = lm_batches(n=2)
    plan = _plan(model, entries={"embed.weight": torch.tensor([5, 70, 300])})
    sg.prepare(model, plan)
    want = _dense_grads(ListMoE(), ["embed.weight"], batches[0])["embed.weight"]
    model(**batches[0])["loss"].backward()
    torch.testing.assert_close(
        model.embed.weight_sg_delta.grad, want.reshape(-1)[plan.entries["embed.weight"]]
    )
    sg.unprepare(model)
    model = ListMoE()
    model.embed.max_norm = 1.0
    with pytest.raises(SurgicalError, match="max_norm"):
        sg.prepare(model, plan)
