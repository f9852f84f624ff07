"""The entry-sparse autograd path: gradients, parity with dense training, frozen bits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from surgical.train import cpu_kernel, sparse
from surgical.train.sparse import attach_entries, csr_pattern, sampled_weight_grad


def _layer(seed=0, out_f=24, in_f=16, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
def test_sampled_grad_equals_dense_grad_gathered(density):
    g = torch.Generator().manual_seed(0)
    gy, x = torch.randn(40, 24, generator=g), torch.randn(40, 16, generator=g)
    k = int(24 * 16 * density)
    idx = torch.randperm(24 * 16, generator=g)[:k].sort().values
    got = sampled_weight_grad(gy, x, idx, csr_pattern(idx, (24, 16), gy.dtype))
    want = (gy.t() @ x).reshape(-1)[idx]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("force_sampled", [True, False])
def test_delta_grad_equals_dense_weight_grad_at_entries(force_sampled, monkeypatch):
    if force_sampled:  # exercise the sampled matmul even at high density
        monkeypatch.setattr(sparse, "DENSE_GATHER_DENSITY", 2.0)
    dense = _layer()
    sp = copy.deepcopy(dense)
    idx = torch.tensor([0, 3, 17, 100, 383])
    delta = attach_entries(sp, idx)
    x = torch.randn(2, 5, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    (dense(x).sin().sum()).backward()
    (sp(x2).sin().sum()).backward()
    torch.testing.assert_close(delta.grad, dense.weight.grad.reshape(-1)[idx])
    torch.testing.assert_close(x2.grad, x.grad)  # input gradient unchanged
    assert sp.weight.grad is None and not sp.weight.requires_grad


def test_dense_product_path_builds_no_pattern(monkeypatch):
    """The CSR pattern (4 B per entry) is built only for the sampled product: never on the
    dense-product path, which CUDA takes at every density."""
    monkeypatch.setattr(sparse, "DENSE_GATHER_DENSITY", 0.0)
    dense = _layer()
    sp = copy.deepcopy(dense)
    idx = torch.tensor([0, 3, 17, 100, 383])
    delta = attach_entries(sp, idx)
    x = torch.randn(2, 5, 16)
    dense(x).sin().sum().backward()
    sp(x).sin().sum().backward()
    torch.testing.assert_close(delta.grad, dense.weight.grad.reshape(-1)[idx])
    assert sp._sg_entries.pattern is None


def test_no_dense_weight_gradient_is_formed(monkeypatch):
    """At low density the backward pass never computes the full gy^T @ x product."""
    sp = _layer(out_f=64, in_f=64)
    attach_entries(sp, torch.arange(0, 64 * 64, 97))
    calls = []
    real_sampled, real_kernel = torch.sparse.sampled_addmm, cpu_kernel.sampled_grad
    monkeypatch.setattr(
        torch.sparse, "sampled_addmm", lambda *a, **k: calls.append("addmm") or real_sampled(*a, **k)
    )
    monkeypatch.setattr(
        cpu_kernel, "sampled_grad", lambda *a, **k: calls.append("kernel") or real_kernel(*a, **k)
    )
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda *a: calls.append("dense"))  # gy^T @ x
    sp(torch.randn(8, 64)).sum().backward()
    # surgical's CPU kernel where it could be built, else torch's sampled product
    assert calls == (["kernel"] if cpu_kernel.library() else ["kernel", "addmm"])


def test_full_density_sparse_training_matches_dense_training():
    """Training every entry through the sparse path gives dense training's loss curve.

    Weight decay is off: on a delta it pulls towards the pretrained weights, not towards zero.
    """
    torch.manual_seed(0)
    model_d = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    model_s = copy.deepcopy(model_d)
    for layer in (model_s[0], model_s[2]):
        attach_entries(layer, torch.arange(layer.weight.numel()))
    data = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(10)]

    def run(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        losses = []
        for x, y in data:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ld, ls = run(model_d), run(model_s)
    assert ld == pytest.approx(ls, rel=1e-5, abs=1e-6)
    with torch.no_grad():
        x = torch.randn(3, 16)
        torch.testing.assert_close(model_s(x), model_d(x), rtol=1e-5, atol=1e-6)


def test_weight_tracks_delta_lazily_and_exactly():
    sp = _layer()
    w0 = sp.weight.detach().clone()
    idx = torch.tensor([1, 2, 50])
    delta = attach_entries(sp, idx)
    with torch.no_grad():
        delta.add_(torch.tensor([0.5, -1.0, 2.0]))
    sp(torch.randn(1, 16))  # forward syncs
    flat = sp.weight.detach().reshape(-1)
    assert torch.equal(flat[idx], torch.add(w0.reshape(-1)[idx], delta.detach()))
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask[idx] = False
    assert torch.equal(flat[mask], w0.reshape(-1)[mask])


@pytest.mark.parametrize("fused", [False, True])
def test_weight_follows_optimizer_even_when_fused(fused):
    """Fused AdamW writes parameters without bumping their version counter; sync still happens."""
    sp = _layer()
    idx = torch.tensor([0, 5, 9])
    delta = attach_entries(sp, idx)
    opt = torch.optim.AdamW([delta], lr=0.1, fused=fused)
    sp(torch.randn(4, 16)).sum().backward()
    opt.step()
    assert delta.abs().sum() > 0
    state = sp.state_dict()  # reading the state dict syncs too
    assert torch.equal(state["weight"].reshape(-1)[idx], torch.add(sp.weight_sg_orig, delta.detach()))


def test_resident_state_is_at_most_28_bytes_per_entry_under_adam():
    """Per entry: delta, its gradient, Adam's two moments and the base value (4 B each in fp32),
    the int32 flat index and the CSR's int32 column index. 28 B, below the 32 B target."""
    sp = _layer(out_f=64, in_f=64)
    k = 400
    idx = torch.randperm(64 * 64, generator=torch.Generator().manual_seed(0))[:k].sort().values
    delta = attach_entries(sp, idx)
    assert sp.weight_sg_indices.dtype == torch.int32
    opt = torch.optim.AdamW([delta], lr=1e-3)
    sp(torch.randn(8, 64)).sum().backward()
    opt.step()
    pattern = sp._sg_entries.csr(sp, delta.dtype)
    assert pattern.values().data_ptr() == delta.data_ptr()  # the CSR values alias the delta
    tensors = [delta, delta.grad, sp.weight_sg_indices, sp.weight_sg_orig, pattern.col_indices()]
    tensors += [t for t in opt.state[delta].values() if t.numel() == k]
    per_entry = sum(t.numel() * t.element_size() for t in tensors) / k
    assert per_entry == 28.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("force_sampled", [False, True])
def test_half_precision_model_trains_entries_on_cpu(dtype, force_sampled, monkeypatch):
    """A model loaded in bf16/fp16: the entry gradient is computed in fp32 and returned in the
    delta's dtype (neither the CPU kernel nor sampled_addmm takes half precision on CPU)."""
    if force_sampled:  # the kernel off: sampled_addmm's path
        monkeypatch.setenv("SURGICAL_CPU_KERNEL", "0")
        monkeypatch.setattr(cpu_kernel, "_LIB", None)
    layer = nn.Linear(64, 32).to(dtype)
    idx = torch.arange(0, 64 * 32, 37)
    delta = attach_entries(layer, idx)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 10, 64, generator=g).to(dtype), torch.randn(3, 10, 32, generator=g)
    (layer(x).float() * w).sum().backward()
    gy = w.to(dtype).float().reshape(-1, 32)  # the output gradient as the layer saw it
    want = (gy.t() @ x.float().reshape(-1, 64)).reshape(-1)[idx]
    assert delta.grad.dtype == dtype
    torch.testing.assert_close(delta.grad.float(), want.to(dtype).float(), rtol=0, atol=0)
    opt = torch.optim.AdamW([delta], lr=1e-2)
    opt.step()
    w_now = layer.state_dict()["weight"].reshape(-1)  # synced lazily: before a forward or a state_dict
    assert torch.equal(w_now[idx], (layer.weight_sg_orig + delta.detach()).to(dtype))
