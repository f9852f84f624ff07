"""Delta arithmetic, apply/revert, the ``applied`` context, value codecs and the size target."""

from __future__ import annotations

import json

import pytest
import torch

import surgical as sg
from conftest import cls_batches, tiny_bert
from surgical.core.codec import decode_values, encode_values
from surgical.core.fingerprint import base_identity


def _random_delta(model, density=0.05, seed=0, full=("classifier.weight",), dense=()) -> sg.Delta:
    """Random entries on every 2-D encoder weight, some dense and replaced tensors."""
    g = torch.Generator().manual_seed(seed)
    d = sg.Delta()
    for name, p in model.named_parameters():
        d.shapes[name] = tuple(p.shape)
        if name in full:
            d.full[name] = torch.randn(p.shape, generator=g)
        elif name in dense:
            d.dense[name] = torch.randn(p.shape, generator=g) * 0.01
        elif p.dim() == 2 and "encoder" in name:
            k = max(1, int(density * p.numel()))
            idx = torch.randperm(p.numel(), generator=g)[:k].sort().values
            d.entries[name] = (idx, torch.randn(k, generator=g) * 0.01)
        else:
            del d.shapes[name]
    d.meta["base"] = base_identity(model, exclude=d.full)
    return d


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def test_apply_then_revert_restores_every_bit(bert):
    before = _params(bert)
    d = _random_delta(bert, dense=("bert.pooler.dense.weight",))
    sg.apply(bert, d)
    assert not _same(before, _params(bert))
    sg.revert(bert, d)
    assert _same(before, _params(bert))


def test_applied_context_nests_and_reverts_in_order(bert):
    before = _params(bert)
    d1, d2 = _random_delta(bert, seed=1, full=()), _random_delta(bert, seed=2, full=())
    x = cls_batches(1)[0]
    x.pop("labels")
    with sg.applied(bert, d1):
        with torch.no_grad():
            one = bert(**x).logits
        with sg.applied(bert, d2):  # the fingerprint check still sees the base under d1
            pass
        with torch.no_grad():
            assert torch.equal(bert(**x).logits, one)
    assert _same(before, _params(bert))
    sg.apply(bert, d1)
    sg.apply(bert, d2)
    with pytest.raises(sg.SurgicalError, match="reverse order"):
        sg.revert(bert, d1)
    with pytest.raises(sg.SurgicalError, match="not applied"):
        sg.revert(bert, _random_delta(bert, seed=3))
    sg.revert(bert, d2)
    sg.revert(bert, d1)
    assert _same(before, _params(bert))
    with pytest.raises(sg.SurgicalError, match="no delta is applied"):
        sg.revert(bert)


def test_applied_reverts_when_the_body_raises(bert):
    before = _params(bert)
    with pytest.raises(RuntimeError), sg.applied(bert, _random_delta(bert)):
        raise RuntimeError("boom")
    assert _same(before, _params(bert))


def test_scale_matches_scaled_apply(bert):
    d = _random_delta(bert, full=())
    a, b = tiny_bert(), tiny_bert()
    sg.apply(a, d, scale=0.5)
    sg.apply(b, d.scale(0.5))
    assert _same(_params(a), _params(b))
    assert torch.equal(
        (2 * d).entries["bert.encoder.layer.0.attention.self.query.weight"][1],
        d.entries["bert.encoder.layer.0.attention.self.query.weight"][1] * 2,
    )


def test_composition_commutes_and_overlapping_entries_add(bert):
    d1, d2 = (
        _random_delta(bert, density=0.3, seed=1, full=()),
        _random_delta(bert, density=0.3, seed=2, full=()),
    )
    name = "bert.encoder.layer.0.attention.self.query.weight"
    ab, ba = d1 + d2, d2 + d1
    for n in ab.entries:
        assert torch.equal(ab.entries[n][0], ba.entries[n][0])
        assert torch.equal(ab.entries[n][1], ba.entries[n][1])
    dense = (d1.to_dense().dense[name] + d2.to_dense().dense[name]).reshape(-1)
    idx, vals = ab.entries[name]
    assert torch.equal(vals, dense[idx])
    overlap = set(d1.entries[name][0].tolist()) & set(d2.entries[name][0].tolist())
    assert overlap and idx.numel() == d1.entries[name][0].numel() + d2.entries[name][0].numel() - len(overlap)
    # the composed delta still passes the base check, and equals applying both (to rounding)
    m1, m2 = tiny_bert(), tiny_bert()
    sg.apply(m1, ab)
    sg.apply(m2, d1)
    sg.apply(m2, d2)
    p1, p2 = _params(m1), _params(m2)
    assert all(torch.allclose(p1[n], p2[n], atol=1e-6) for n in p1)
    weighted = sg.compose([d1, d2], weights=[0.5, 2.0])
    assert torch.allclose(weighted.entries[name][1], (d1.scale(0.5) + d2.scale(2.0)).entries[name][1])


def test_composition_conflicts_are_clear(bert):
    d1, d2 = _random_delta(bert, seed=1), _random_delta(bert, seed=2)
    with pytest.raises(sg.SurgicalError, match="replaces it"):
        d1 + d2  # noqa: B018  both replace the classifier with different values
    other = _random_delta(tiny_bert(seed=7), seed=1, full=())
    with pytest.raises(sg.SurgicalError, match="different base models"):
        _random_delta(bert, seed=2, full=()) + other  # noqa: B018


def test_to_dense_applies_like_the_entries(bert):
    d = _random_delta(bert)
    a, b = tiny_bert(), tiny_bert()
    sg.apply(a, d)
    sg.apply(b, d.to_dense())
    assert _same(_params(a), _params(b))  # adding zeros elsewhere changes no bit


def test_prune_keeps_the_largest(bert):
    d = _random_delta(bert, density=0.2, dense=("bert.pooler.dense.weight",))
    p = d.prune(0.25)
    name = "bert.encoder.layer.1.output.dense.weight"
    idx, vals = d.entries[name]
    pidx, pvals = p.entries[name]
    assert pidx.numel() == round(0.25 * idx.numel())
    assert pvals.abs().min() >= vals.abs().sort(descending=True).values[pidx.numel() - 1]
    assert torch.equal(pidx, pidx.sort().values)
    assert "bert.pooler.dense.weight" in p.entries  # dense tensors become entries


@pytest.mark.parametrize("codec", ["float32", "float16", "bfloat16", "int8", "sign"])
def test_value_codecs_roundtrip_and_are_idempotent(codec):
    v = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    once = decode_values(encode_values(v, codec), codec, v.numel())
    twice = decode_values(encode_values(once, codec), codec, v.numel())
    assert torch.equal(once, twice)
    err = {"float32": 0, "float16": 1e-3, "bfloat16": 1e-2, "int8": 0.02, "sign": 1.0}[codec]
    assert float((once - v).abs().max()) <= err * float(v.abs().max()) + 1e-12
    if codec == "sign":
        assert torch.equal(once.sign(), v.sign()) and torch.allclose(once.abs(), v.abs().mean().expand(1001))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8", "sign"])
def test_every_kind_roundtrips_through_files(bert, tmp_path, dtype):
    d = _random_delta(bert, dense=("bert.pooler.dense.weight",)).compress(1.0, dtype)
    d.save(tmp_path / "d", dtype=dtype)
    back = sg.Delta.load(tmp_path / "d")
    assert back.shapes == d.shapes and back.meta == d.meta
    for n, (i, v) in d.entries.items():
        assert torch.equal(back.entries[n][0], i) and torch.equal(back.entries[n][1], v)
    whole = torch.float32 if dtype == "float32" else getattr(torch, dtype, torch.bfloat16)
    whole = whole if dtype in ("float32", "float16", "bfloat16") else torch.bfloat16
    for kind in ("dense", "full"):
        for n, t in getattr(d, kind).items():
            assert torch.equal(getattr(back, kind)[n], t.to(whole).float())
    sg.apply(tiny_bert(), back)  # the base check passes after the round trip


def test_size_target_bf16_at_one_percent(tmp_path):
    """A fixed synthetic 1% delta over 30 Linear weights of 576x1536: <= 4.5 bytes per entry."""
    g = torch.Generator().manual_seed(0)
    d = sg.Delta()
    for layer in range(30):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        numel = 576 * 1536
        k = numel // 100
        idx = torch.randperm(numel, generator=g)[:k].sort().values
        d.entries[name], d.shapes[name] = (idx, torch.randn(k, generator=g) * 1e-3), (1536, 576)
    d.save(tmp_path / "d", dtype="bfloat16")
    size = sum(f.stat().st_size for f in (tmp_path / "d").iterdir())
    per_entry = size / d.num_entries
    print(f"bytes per entry (bf16, 1% density, config included): {per_entry:.3f}")
    assert per_entry <= 4.5
    d.save(tmp_path / "s", dtype="sign")
    assert sum(f.stat().st_size for f in (tmp_path / "s").iterdir()) / d.num_entries <= 2.3


def test_corrupted_tensors_are_named(tmp_path, bert):
    d = _random_delta(bert)
    d.save(tmp_path / "d")
    cfg_path = tmp_path / "d" / "delta_config.json"
    cfg = json.loads(cfg_path.read_text())
    name = next(iter(d.entries))
    cfg["tensors"][name]["shape"] = [2, 2]  # indices now beyond the shape
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(sg.SurgicalError, match="corrupted.*beyond its shape"):
        sg.Delta.load(tmp_path / "d")
    d.save(tmp_path / "d")
    cfg = json.loads(cfg_path.read_text())
    cfg["tensors"][name]["count"] += 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(sg.SurgicalError, match="corrupted"):
        sg.Delta.load(tmp_path / "d")
    d.save(tmp_path / "d")
    raw = bytearray((tmp_path / "d" / "delta.safetensors").read_bytes())
    raw[10:30] = b"\xff" * 20  # damage the header
    (tmp_path / "d" / "delta.safetensors").write_bytes(bytes(raw))
    with pytest.raises(sg.SurgicalError, match="delta.safetensors.*truncated or corrupted"):
        sg.Delta.load(tmp_path / "d")


def test_inf_in_a_file_is_refused_naming_it(tmp_path, bert):
    from safetensors.torch import load_file, save_file

    d = _random_delta(bert)
    d.save(tmp_path / "d")
    f = tmp_path / "d" / "delta.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if k.endswith(".values"))
    tensors[key][0] = float("inf")
    save_file(tensors, str(f))
    with pytest.raises(sg.SurgicalError, match="NaN or Inf"):
        sg.Delta.load(tmp_path / "d")


def test_wrong_base_error_names_both_fingerprints(bert):
    d = _random_delta(bert)
    other = tiny_bert(seed=3)
    with pytest.raises(sg.SurgicalError, match=r"fingerprint \w+\) is not the base .*fingerprint \w+\)"):
        sg.apply(other, d)
    sg.apply(other, d, force=True)


def test_fingerprint_ignores_dtype(bert):
    d = _random_delta(bert, full=())
    sg.apply(tiny_bert().to(torch.bfloat16), d)  # same base, other dtype: accepted


def test_layer_grid_places_each_tensor(bert):
    from surgical.delta.inspect import layer_grid, tensor_rows

    d = _random_delta(bert, density=0.1)
    layers, modules, grid = layer_grid(d)
    assert layers == [0, 1] and "attention.self.query" in modules
    j = modules.index("attention.self.query")
    assert abs(float(grid[1, j]) - 0.1) < 0.01
    rows = {r["name"]: r for r in tensor_rows(d)}
    assert rows["classifier.weight"]["kind"] == "full" and rows["classifier.weight"]["share"] == 1.0


@pytest.mark.parametrize("numel", [1, 63, 64, 65, 28_311_552, 2**31 + 7])
def test_fingerprint_positions_stay_inside_the_tensor(numel):
    from surgical.core.fingerprint import SAMPLE, sample_positions

    pos = sample_positions(numel)
    assert pos.numel() == min(numel, SAMPLE) and int(pos.max()) == numel - 1 and int(pos.min()) == 0
    assert bool((pos[1:] > pos[:-1]).all())


def test_float16_overflow_is_refused_at_save(tmp_path):
    d = sg.Delta(entries={"w": (torch.tensor([0, 5]), torch.tensor([1.0, 1e6]))}, shapes={"w": (4, 4)})
    with pytest.raises(sg.SurgicalError, match="overflows float16"):
        d.save(tmp_path / "d", dtype="float16")
    assert not (tmp_path / "d").exists()
    d.save(tmp_path / "d", dtype="bfloat16")


def test_scale_needs_a_number_and_a_second_apply_of_one_delta_warns(bert, tmp_path):
    d = _random_delta(tiny_bert())
    for bad in ("x", True, float("nan"), None):
        with pytest.raises(sg.SurgicalError, match="a delta's scale must be a finite number"):
            d.scale(bad)
    assert d.scale(2).digest() == (2 * d).digest() == d.scale(2.0).digest()
    model = tiny_bert()
    sg.apply(model, d)
    with pytest.warns(UserWarning, match="already applied to the model; applying it again adds its change"):
        sg.apply(model, sg.Delta.load(d.save(tmp_path / "d")))  # the same delta, by content
