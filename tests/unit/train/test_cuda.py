"""The training engine, selection and deltas on a CUDA device (skipped without one).

Everything else in the suite runs on CPU; these tests check that the same numbers come out on a
GPU: entry gradients (the dense product gathered, and cuSPARSE's SDDMM when forced), row/column
and tied-embedding blocks, bf16 autocast (bf16 entry products), ``sg.fit`` followed by a delta
applied to a CPU model, selection scores, and delta apply/revert. Tiny models: seconds on one GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

import surgical as sg
from conftest import lm_batches, tiny_llama
from surgical.select.api import default_targets
from surgical.select.criteria import CRITERIA, ScoreContext
from surgical.select.plan import Plan
from surgical.train import sparse
from surgical.train.schedules import Regrow
from surgical.train.sparse import csr_pattern, sampled_weight_grad

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
EMB = "model.embed_tokens.weight"


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 matmuls in full precision (TF32 would loosen every tolerance below to ~1e-3)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _cuda(batch: dict) -> dict:
    return {k: v.to(CUDA) for k, v in batch.items()}


def _delta_of(model, name: str) -> torch.nn.Parameter:
    return model.get_parameter(name.replace(".weight", ".weight_sg_delta"))


def _dense_twin(model, names) -> torch.nn.Module:
    """A copy of ``model`` in which exactly ``names`` train, densely."""
    dense = copy.deepcopy(model)
    for n, p in dense.named_parameters():
        p.requires_grad_(n in names)
    return dense


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """fp32 agreement up to summation order: relative, with an absolute floor at the tensor's scale."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.detach().abs().max()) + 1e-12)


@pytest.mark.parametrize("force_sampled", [False, True])
@pytest.mark.parametrize(("shape", "tokens", "density"), [((24, 16), 40, 0.05), ((256, 512), 1024, 0.01),
                                                          ((256, 512), 1024, 0.2)])  # fmt: skip
def test_sampled_matmul_on_cuda_is_the_dense_gradient_gathered(
    shape, tokens, density, force_sampled, monkeypatch
):
    if force_sampled:  # cuSPARSE's SDDMM, which surgical does not use by default
        monkeypatch.setattr(sparse, "CUDA_DENSE_GATHER_DENSITY", 2.0)
    g = torch.Generator().manual_seed(0)
    gy, x = torch.randn(tokens, shape[0], generator=g), torch.randn(tokens, shape[1], generator=g)
    k = max(1, int(shape[0] * shape[1] * density))
    idx = torch.randperm(shape[0] * shape[1], generator=g)[:k].sort().values.to(torch.int32)
    pattern = csr_pattern(idx.to(CUDA), shape, torch.float32)
    assert pattern.is_cuda and pattern.crow_indices().dtype == torch.int32
    got = sampled_weight_grad(gy.to(CUDA), x.to(CUDA), idx.to(CUDA), pattern)
    assert got.is_cuda and got.shape == (k,)
    want = (gy.double().t() @ x.double()).reshape(-1)[idx.long()]
    _close(got.cpu().double(), want)


@pytest.mark.parametrize(("density", "force_sampled"), [(0.05, False), (0.5, False), (0.5, True)])
def test_entry_grads_on_cuda_equal_the_dense_grads_gathered(density, force_sampled, monkeypatch):
    """By the dense product gathered (CUDA_DENSE_GATHER_DENSITY), or forced through cuSPARSE's SDDMM."""
    if force_sampled:
        monkeypatch.setattr(sparse, "CUDA_DENSE_GATHER_DENSITY", 2.0)
    calls = []
    real = torch.sparse.sampled_addmm
    monkeypatch.setattr(
        torch.sparse, "sampled_addmm", lambda *a, **k: calls.append(a[1].is_cuda) or real(*a, **k)
    )
    batch = _cuda(lm_batches(n=1)[0])
    model = tiny_llama().to(CUDA).train()
    plan = sg.select(model, method="random", density=density, seed=3, progress=False)
    dense = _dense_twin(model, set(plan.entries))
    sg.prepare(model, plan)
    loss = model(**batch).loss
    loss.backward()
    dense_loss = dense(**batch).loss
    dense_loss.backward()
    assert torch.equal(loss, dense_loss)  # the same forward: W holds base + delta (zero so far)
    for name, idx in plan.entries.items():
        got = _delta_of(model, name).grad
        assert got.is_cuda and model.get_parameter(name).grad is None
        _close(got, dense.get_parameter(name).grad.reshape(-1)[idx.to(CUDA)])
    sampled = density < sparse.CUDA_DENSE_GATHER_DENSITY or force_sampled
    assert calls == ([True] * len(plan.entries) if sampled else [])  # on the GPU, once per trained Linear


@pytest.mark.parametrize("fused", [False, True])
def test_frozen_entries_stay_bit_identical_after_optimizer_steps_on_cuda(fused):
    model = tiny_llama().to(CUDA).train()
    base = {n: t.clone() for n, t in model.state_dict().items()}
    plan = sg.select(model, method="random", density=0.05, seed=1, progress=False)
    sg.prepare(model, plan)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused)
    for batch in lm_batches(n=3):
        model(**_cuda(batch)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = model.state_dict()  # syncs the weights (fused AdamW does not bump version counters)
    for name, w0 in base.items():
        w = state[name]
        if name not in plan.entries:
            assert torch.equal(w, w0), name
            continue
        idx = plan.entries[name].to(CUDA)
        frozen = torch.ones(w.numel(), dtype=torch.bool, device=CUDA)
        frozen[idx] = False
        assert torch.equal(w.reshape(-1)[frozen], w0.reshape(-1)[frozen]), name
        module = model.get_submodule(name.rpartition(".")[0])
        trained = torch.add(module.weight_sg_orig, module.weight_sg_delta.detach())
        assert torch.equal(w.reshape(-1)[idx], trained) and not torch.equal(trained, w0.reshape(-1)[idx])


@pytest.mark.parametrize("force_sampled", [False, True])
def test_full_density_entries_train_like_dense_on_cuda(force_sampled, monkeypatch):
    """Every entry of every Linear through the sparse path: the loss curve of dense training."""
    if force_sampled:
        monkeypatch.setattr(sparse, "CUDA_DENSE_GATHER_DENSITY", 2.0)
    model = tiny_llama().to(CUDA).train()
    targets = default_targets(model)
    dense = _dense_twin(model, set(targets))
    plan = Plan(entries={n: torch.arange(model.get_parameter(n).numel()) for n in targets},
                shapes={n: tuple(model.get_parameter(n).shape) for n in targets})  # fmt: skip
    sg.prepare(model, plan)

    def run(m):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
        losses = []
        for batch in lm_batches(n=6, seed=4):
            loss = m(**_cuda(batch)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    ls, ld = run(model), run(dense)
    assert ls == pytest.approx(ld, rel=1e-5, abs=1e-6) and ls[-1] < ls[0]
    sg.unprepare(model)
    for n in targets:
        _close(model.get_parameter(n), dense.get_parameter(n))


@pytest.mark.parametrize("kind", ["rows", "cols"])
def test_row_and_column_blocks_on_cuda(kind):
    axis = 0 if kind == "rows" else 1
    model = tiny_llama().to(CUDA).train()
    targets = default_targets(model)
    g = torch.Generator().manual_seed(0)
    sel = {
        n: torch.randperm(model.get_parameter(n).shape[axis], generator=g)[:5].sort().values for n in targets
    }
    plan = Plan(**{kind: sel}, shapes={n: tuple(model.get_parameter(n).shape) for n in targets})
    base = {n: model.get_parameter(n).detach().clone() for n in targets}
    dense = _dense_twin(model, set(targets))
    sg.prepare(model, plan)
    batch = _cuda(lm_batches(n=1)[0])
    model(**batch).loss.backward()
    dense(**batch).loss.backward()
    for n, s in sel.items():
        block = _delta_of(model, n)
        assert block.grad.is_cuda and block.grad.shape == block.shape
        _close(block.grad, dense.get_parameter(n).grad.index_select(axis, s.to(CUDA)))
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    sg.sync(model)
    for n, s in sel.items():  # only the selected rows/columns moved
        w, w0 = model.get_parameter(n), base[n]
        rest = torch.ones(w.shape[axis], dtype=torch.bool, device=CUDA)
        rest[s.to(CUDA)] = False
        others = rest.nonzero().flatten()
        assert torch.equal(w.index_select(axis, others), w0.index_select(axis, others))
        assert not torch.equal(w, w0)


def test_tied_embedding_rows_on_cuda():
    """One block for the lookup and the LM head: its gradient is the dense tied gradient at the rows."""
    batches = lm_batches(n=2)
    seen = torch.unique(batches[0]["input_ids"])
    absent = sorted(set(range(100)) - set(torch.cat([b["input_ids"].reshape(-1) for b in batches]).tolist()))
    rows = torch.tensor(sorted(seen[:4].tolist() + absent[:2]))
    model = tiny_llama().to(CUDA).train()
    dense = _dense_twin(model, {EMB})
    sg.prepare(model, Plan(rows={"lm_head.weight": rows}, shapes={"lm_head.weight": (100, 32)}))
    block = model.model.embed_tokens.weight_sg_delta
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "model.embed_tokens.weight_sg_delta"
    ]
    model(**_cuda(batches[0])).loss.backward()
    dense(**_cuda(batches[0])).loss.backward()
    _close(block.grad, dense.get_parameter(EMB).grad[rows.to(CUDA)])
    torch.optim.AdamW([block], lr=1e-2).step()
    model(**_cuda(batches[1]))  # the forward syncs the shared weight once, for both users
    assert model.lm_head.weight is model.model.embed_tokens.weight
    w = model.lm_head.weight
    torch.testing.assert_close(w[rows.to(CUDA)], model.model.embed_tokens.weight_sg_base + block.detach(),
                               rtol=0, atol=0)  # fmt: skip


def test_bf16_autocast_on_cuda_gives_fp32_like_grads_and_trains():
    batch = _cuda(lm_batches(n=1)[0])
    model = tiny_llama().to(CUDA).train()
    plan = sg.select(model, method="random", density=0.05, seed=2, progress=False)
    dense = _dense_twin(model, set(plan.entries))
    sg.prepare(model, plan)

    def grads(m, bf16: bool, names) -> torch.Tensor:
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = m(**batch).loss
        assert loss.dtype == torch.float32
        loss.backward()
        return torch.cat([g.reshape(-1) for g in names(m)])

    def deltas(m):
        return [_delta_of(m, n).grad for n in plan.entries]

    def gathered(m):
        return [m.get_parameter(n).grad.reshape(-1)[i.to(CUDA)] for n, i in plan.entries.items()]

    g16, g32 = grads(model, True, deltas), grads(model, False, deltas)
    assert g16.dtype == torch.float32  # the delta's gradient is accumulated in fp32
    assert float((g16 - g32).norm() / g32.norm()) < 0.05
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 0.999
    # against dense training under the same autocast: as close as bf16 allows
    torch.testing.assert_close(
        g16, grads(dense, True, gathered), rtol=0.05, atol=0.05 * float(g32.abs().max())
    )
    res = sg.fit(model, [_cuda(b) for b in lm_batches(n=4)], max_steps=4, lr=1e-2, bf16=True, show=False)
    assert res.steps == 4 and all(torch.isfinite(torch.tensor(res.losses)))
    assert all(_delta_of(model, n).dtype == torch.float32 and _delta_of(model, n).abs().sum() > 0
               for n in plan.entries)  # fmt: skip


def test_bf16_autocast_entry_products_run_in_bf16_on_cuda():
    """Under bf16 autocast an entry gradient is a bf16 tensor-core product (fp32 accumulation in
    the matmul), as autocast's own weight gradients and LoRA's are, not an fp32 product of
    upcast copies; an fp32 input (a block's first) is cast to bf16 as autocast casts it."""
    g = torch.Generator().manual_seed(0)
    gy = torch.randn(1024, 256, generator=g).to(CUDA, torch.bfloat16)
    x = torch.randn(1024, 512, generator=g).to(CUDA)
    idx = torch.randperm(256 * 512, generator=g)[:1310].sort().values.to(torch.int32).to(CUDA)
    got = sampled_weight_grad(gy, x, idx, lambda: None, torch.float32)
    assert got.dtype == torch.bfloat16  # the caller casts to the delta's dtype
    assert torch.equal(got, (gy.t() @ x.bfloat16()).reshape(-1)[idx.long()])
    fp32 = (gy.float().t() @ x).reshape(-1)[idx.long()]
    _close(got.float(), fp32, rtol=0.02)  # as close as bf16 inputs and output allow
    # fp32 operands (no autocast) stay fp32
    assert sampled_weight_grad(gy.float(), x, idx, lambda: None).dtype == torch.float32


def _mixed_plan(model) -> Plan:
    """Entries, rows, columns, tied embedding rows and a dense tensor: every sparse path at once."""
    g = torch.Generator().manual_seed(5)
    shape = {n: tuple(p.shape) for n, p in model.named_parameters()}
    layer0 = [n for n in default_targets(model) if ".layers.0." in n]
    entries = {
        n: torch.randperm(model.get_parameter(n).numel(), generator=g)[:60].sort().values for n in layer0
    }
    rows = {n: torch.tensor([1, 4, 9]) for n in default_targets(model) if ".layers.1.mlp." in n}
    rows[EMB] = torch.tensor([3, 7, 50])
    cols = {"model.layers.1.self_attn.o_proj.weight": torch.tensor([0, 2, 31])}
    dense = ["model.norm.weight"]
    names = [*entries, *rows, *cols, *dense]
    return Plan(entries=entries, rows=rows, cols=cols, dense=dense, shapes={n: shape[n] for n in names})


def test_fit_on_cuda_then_delta_applied_to_a_cpu_base_reproduces_the_weights(tmp_path):
    model = tiny_llama().to(CUDA)
    plan = _mixed_plan(model)
    sg.prepare(model, plan)
    res = sg.fit(model, lm_batches(n=4), max_steps=4, lr=1e-2, show=False)  # CPU batches: fit moves them
    assert res.steps == 4 and res.losses[-1] < res.losses[0]
    delta = sg.extract(model)
    for idx, vals in delta.entries.values():
        assert idx.device.type == "cpu" and vals.device.type == "cpu"
    delta.save(tmp_path / "d")
    trained = {n: t.cpu() for n, t in sg.unprepare(model).state_dict().items()}
    for target in ("cpu", "cuda"):
        fresh = tiny_llama().to(target)
        sg.apply(fresh, sg.Delta.load(tmp_path / "d"))  # also checks the base fingerprint across devices
        got = fresh.state_dict()
        assert set(got) == set(trained)
        for n, t in trained.items():
            assert torch.equal(got[n].cpu(), t), (target, n)
    untouched = tiny_llama().state_dict()
    changed = [n for n, t in trained.items() if not torch.equal(t, untouched[n])]
    assert set(changed) >= set(plan.sparse_names) | set(plan.dense)


def test_fit_on_cuda_resumes_from_a_checkpoint_like_an_uninterrupted_run(tmp_path):
    from surgical.train.hooks import TrainHook

    class Stop(TrainHook):
        def on_step_end(self, state):
            if state.step == 3:
                raise KeyboardInterrupt

    batches = lm_batches(n=4)
    run = dict(max_steps=5, lr=1e-2, show=False, checkpoint_every=2)

    def prepared():
        model = tiny_llama().to(CUDA)
        return sg.prepare(model, sg.select(model, method="random", density=0.1, seed=0, progress=False))

    whole = prepared()
    sg.fit(whole, batches, checkpoint_dir=tmp_path / "a", hooks=[Regrow(every=2)], **run)
    with pytest.raises(KeyboardInterrupt):
        sg.fit(prepared(), batches, checkpoint_dir=tmp_path / "b", hooks=[Regrow(every=2), Stop()], **run)
    resumed = prepared()
    res = sg.fit(resumed, batches, checkpoint_dir=tmp_path / "b", resume=True, hooks=[Regrow(every=2)], **run)
    assert res.resumed_from == 2 and res.steps == 5
    a, b = sg.extract(whole), sg.extract(resumed)
    assert a.entries.keys() == b.entries.keys()
    for n, (idx, vals) in a.entries.items():
        assert torch.equal(idx, b.entries[n][0])
        _close(b.entries[n][1], vals)


@pytest.mark.parametrize(
    ("method", "options"),
    [("magnitude", {}), ("principal", {}), ("gradient", {}), ("fisher", {}), ("salience", {}),
     ("lottery", {}), ("rgn", {}), ("fim_layer", {})],
)  # fmt: skip
def test_selection_scores_on_cuda_match_cpu(method, options):
    batches = lm_batches(n=3)
    scores = {}
    for device in ("cpu", "cuda"):
        model = tiny_llama().to(device)
        before = {n: t.clone() for n, t in model.state_dict().items()}
        params = {n: model.get_parameter(n) for n in default_targets(model)}
        ctx = ScoreContext(
            model, params, batches, max_batches=3, seed=0, progress=False, options=dict(options)
        )
        scores[device] = {n: s.detach().double().cpu() for n, s in CRITERIA.get(method)(ctx).items()}
        assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())  # left unchanged
    assert scores["cpu"].keys() == scores["cuda"].keys()
    for n, s in scores["cpu"].items():
        # lottery's Adam step is ~lr * sign(g): entries whose gradient is ~0 may differ by rounding
        rtol = 1e-3 if method == "lottery" else 1e-4
        torch.testing.assert_close(scores["cuda"][n], s, rtol=rtol, atol=rtol * float(s.abs().max()))


def test_select_on_cuda_gives_the_cpu_plan():
    batches = lm_batches(n=3)
    plans = {}
    for device in ("cpu", "cuda"):
        model = tiny_llama().to(device)
        plans[device] = sg.select(model, batches, method="gradient", density=0.05, progress=False)
    a, b = plans["cpu"], plans["cuda"]
    assert a.entries.keys() == b.entries.keys()
    picked_a = sum(int(i.numel()) for i in a.entries.values())
    same = sum(int(torch.isin(a.entries[n], b.entries[n].cpu()).sum()) for n in a.entries)
    assert same >= 0.99 * picked_a  # identical up to near-ties at the threshold


def test_apply_and_revert_on_cuda_are_bit_exact(tmp_path):
    trained = tiny_llama(seed=0)
    sg.prepare(trained, _mixed_plan(trained))
    sg.fit(trained, lm_batches(n=2), max_steps=2, lr=1e-2, show=False)
    delta = sg.extract(trained)
    want = sg.unprepare(trained).state_dict()
    model = tiny_llama(seed=0).to(CUDA)
    base = {n: t.clone() for n, t in model.state_dict().items()}
    for _ in range(2):  # apply, revert, apply again: the same bits each time
        sg.apply(model, delta)
        assert all(torch.equal(t.cpu(), want[n]) for n, t in model.state_dict().items())
        sg.revert(model, delta)
        assert all(torch.equal(t, base[n]) for n, t in model.state_dict().items())
    with sg.applied(model, delta, scale=0.5):
        assert not torch.equal(model.get_parameter("model.norm.weight"), base["model.norm.weight"])
    assert all(torch.equal(t, base[n]) for n, t in model.state_dict().items())
