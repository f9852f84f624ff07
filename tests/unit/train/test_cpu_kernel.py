"""The CPU kernel for entry gradients: exact against the dense gradient, on every code path."""

from __future__ import annotations

import warnings

import pytest
import torch

from surgical.train import cpu_kernel
from surgical.train.sparse import csr_pattern, sampled_weight_grad


def _case(tokens: int, out_f: int, in_f: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(out_f * in_f, generator=g)[:k].sort().values.to(torch.int32)
    gy = torch.randn(tokens, out_f, generator=g)
    x = torch.randn(tokens, in_f, generator=g)
    return gy, x, idx, csr_pattern(idx, (out_f, in_f), torch.float32)


def _reference(gy, x, idx):
    return (gy.double().t() @ x.double()).view(-1)[idx.long()].float()


# tokens off the 16- and 64-token tiles, widths off the 16-wide tiles, rows holding 0..9 entries
SHAPES = [
    (512, 64, 48, 300), (100, 33, 50, 200), (7, 16, 16, 40), (64, 5, 3, 15), (130, 40, 17, 1), (3, 9, 9, 0)
]  # fmt: skip


@pytest.fixture(scope="module")
def lib():
    lib = cpu_kernel.library()
    if lib is None:
        pytest.skip("no C++ compiler here: the fallback is tested below")
    return lib


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_dense_gradient(lib, shape):
    gy, x, idx, pat = _case(*shape)
    got = cpu_kernel.sampled_grad(gy, x, pat, lib)
    assert got.shape == (shape[3],)
    torch.testing.assert_close(got, _reference(gy, x, idx), rtol=1e-5, atol=1e-5)


def test_portable_build_matches_dense_gradient(tmp_path):
    """The path for CPUs without AVX-512, forced here by turning it off at compile time."""
    try:
        lib = cpu_kernel.load(cpu_kernel.build(("-mno-avx512f",), directory=tmp_path))
    except cpu_kernel.KernelBuildError as e:
        pytest.skip(f"no portable build here: {e}")
    assert lib.sg_sampled_grad_avx512() == 0
    for shape in SHAPES[:3]:
        gy, x, idx, pat = _case(*shape)
        torch.testing.assert_close(cpu_kernel.sampled_grad(gy, x, pat, lib), _reference(gy, x, idx))


@pytest.mark.parametrize("tokens", [300, 40, 17])  # more chunks than threads, as many, fewer
def test_threads_split_the_tokens_and_agree(lib, tokens):
    gy, x, idx, pat = _case(tokens, 96, 80, 2000, seed=3)
    want = _reference(gy, x, idx)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got = cpu_kernel.sampled_grad(gy, x, pat, lib)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            # partial sums are added in thread order: the same thread count gives the same bits
            assert torch.equal(got, cpu_kernel.sampled_grad(gy, x, pat, lib))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_operands_give_the_bits_of_their_fp32_copies(lib, shape, threads):
    """bf16 autocast hands the kernel bf16 gradients and inputs: widened as they are transposed,
    they give exactly what upcasting them first would, in each mix of dtypes."""
    gy, x, idx, pat = _case(*shape)
    gy, x = gy.bfloat16(), x.bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        want = cpu_kernel.sampled_grad(gy.float(), x.float(), pat, lib)
        for a, b in ((gy, x), (gy, x.float()), (gy.float(), x)):
            got = cpu_kernel.sampled_grad(a, b, pat, lib)
            assert got.dtype == torch.float32 and torch.equal(got, want)
    finally:
        torch.set_num_threads(before)


def test_portable_build_takes_bf16_operands(tmp_path):
    try:
        lib = cpu_kernel.load(cpu_kernel.build(("-mno-avx512f",), directory=tmp_path))
    except cpu_kernel.KernelBuildError as e:
        pytest.skip(f"no portable build here: {e}")
    gy, x, idx, pat = _case(100, 33, 50, 200)
    gy, x = gy.bfloat16(), x.bfloat16()
    want = cpu_kernel.sampled_grad(gy.float(), x.float(), pat, lib)
    assert torch.equal(cpu_kernel.sampled_grad(gy, x, pat, lib), want)


def test_sampled_weight_grad_keeps_bf16_operands_on_cpu(lib, monkeypatch):
    """Under CPU autocast the entry gradient reaches the kernel without fp32 copies of the
    operands, with the bits the copies would give; above the gather density (and without the
    kernel) the operands are cast to the compute dtype."""
    gy, x, idx, pat = _case(256, 64, 64, 400)
    gy, x = gy.bfloat16(), x.bfloat16()
    seen = []
    real = cpu_kernel.sampled_grad
    monkeypatch.setattr(
        cpu_kernel, "sampled_grad", lambda a, b, p: seen.append((a.dtype, b.dtype)) or real(a, b, p)
    )
    got = sampled_weight_grad(gy, x, idx, pat, torch.float32)
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert torch.equal(got, sampled_weight_grad(gy.float(), x.float(), idx, pat))
    dense_idx = torch.arange(0, 64 * 64, 2, dtype=torch.int32)  # 50% density: the dense product
    got = sampled_weight_grad(gy, x, dense_idx, lambda: None, torch.float32)
    assert got.dtype == torch.float32
    assert torch.equal(got, (gy.float().t() @ x.float()).view(-1)[dense_idx.long()])


def test_sampled_weight_grad_uses_it_and_agrees_with_sampled_addmm(lib):
    gy, x, idx, pat = _case(256, 64, 64, 400)
    ours = sampled_weight_grad(gy, x, idx, pat)
    torch.testing.assert_close(ours, cpu_kernel.sampled_grad(gy, x, pat, lib), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch.sparse.sampled_addmm(pat, gy.t(), x, beta=0.0).values()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_what_it_does_not_take_goes_to_sampled_addmm(lib):
    gy, x, idx, pat = _case(32, 8, 8, 10)
    assert cpu_kernel.sampled_grad(gy.double(), x.double(), pat.to(torch.float64), lib) is None
    crow, col = pat.crow_indices().long(), pat.col_indices().long()
    wide = torch.sparse_csr_tensor(crow, col, pat.values(), size=(8, 8), check_invariants=True)
    assert cpu_kernel.sampled_grad(gy, x, wide, lib) is None
    with pytest.raises(ValueError, match="do not fit"):
        cpu_kernel.sampled_grad(gy[:, :4], x, pat, lib)


def test_build_is_cached(tmp_path):
    try:
        first = cpu_kernel.build(directory=tmp_path)
    except cpu_kernel.KernelBuildError as e:
        pytest.skip(str(e))
    stamp = first.stat().st_mtime_ns
    assert cpu_kernel.build(directory=tmp_path) == first
    assert first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp files left behind


def test_write_entries_sets_base_plus_delta_at_the_indices(lib):
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(40, 30, generator=g)
    idx = torch.randperm(1200, generator=g)[:300].sort().values.to(torch.int32)
    orig, delta = torch.randn(300, generator=g), torch.randn(300, generator=g)
    want = weight.clone()
    want.view(-1)[idx.long()] = orig + delta
    assert cpu_kernel.write_entries(weight, idx, orig, delta)
    assert torch.equal(weight, want)
    # what it does not take is left to torch: other dtypes, int64 indices, a strided weight
    assert not cpu_kernel.write_entries(weight.double(), idx, orig.double(), delta.double())
    assert not cpu_kernel.write_entries(weight, idx.long(), orig, delta)
    assert not cpu_kernel.write_entries(weight.t(), idx, orig, delta)
    assert not cpu_kernel.write_entries(weight, idx, orig[:10], delta)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The module as in a new process, with an empty kernel cache."""
    monkeypatch.setattr(cpu_kernel, "_LIB", None)
    monkeypatch.setattr(cpu_kernel, "_TRIED", False)
    monkeypatch.setenv("SURGICAL_CACHE", str(tmp_path))


def test_no_compiler_warns_once_and_falls_back(fresh, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.warns(RuntimeWarning, match="sampled_addmm"):
        assert cpu_kernel.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        assert cpu_kernel.library() is None
        gy, x, idx, pat = _case(64, 16, 16, 30)
        torch.testing.assert_close(sampled_weight_grad(gy, x, idx, pat), _reference(gy, x, idx))


def test_switched_off_builds_nothing(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("SURGICAL_CPU_KERNEL", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernel.library() is None
    assert not (tmp_path / "kernels").exists()
