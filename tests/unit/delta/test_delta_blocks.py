"""Row and column kinds of a delta: files, apply/revert, training round trip, algebra, size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgical as sg
from conftest import cls_batches, tiny_bert
from surgical.core.codec import VALUE_CODECS
from surgical.core.fingerprint import base_identity, model_fingerprint
from surgical.delta.inspect import layer_grid, tensor_rows
from surgical.select.plan import Plan

Q = "bert.encoder.layer.0.attention.self.query.weight"  # (32, 32)
UP = "bert.encoder.layer.1.intermediate.dense.weight"  # (64, 32)
DOWN = "bert.encoder.layer.1.output.dense.weight"  # (32, 64)
EMB = "bert.embeddings.word_embeddings.weight"  # (100, 32)


def _rows_delta(model, seed=0, rows=(1, 4, 9, 31), cols=(0, 2, 63), tokens=(3, 50, 99)) -> sg.Delta:
    """Rows on a Linear and an Embedding, columns on a Linear, a replaced head."""
    g = torch.Generator().manual_seed(seed)
    d = sg.Delta()
    for name, kind, sel in ((Q, "rows", rows), (EMB, "rows", tokens), (DOWN, "cols", cols)):
        shape = tuple(model.get_parameter(name).shape)
        idx = torch.tensor(sel, dtype=torch.int64)
        block = (len(sel), shape[1]) if kind == "rows" else (shape[0], len(sel))
        d.blocks(kind)[name], d.shapes[name] = (idx, torch.randn(block, generator=g) * 0.01), shape
    d.full["classifier.bias"], d.shapes["classifier.bias"] = torch.randn(2, generator=g), (2,)
    d.meta["base"] = base_identity(model, exclude=d.full)
    return d


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", VALUE_CODECS)
def test_rows_and_cols_roundtrip_exactly_in_every_dtype(bert, tmp_path, dtype):
    d = _rows_delta(bert).compress(1.0, dtype)  # what the codec stores, so the trip must be exact
    d.save(tmp_path / "d", dtype=dtype)
    cfg = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    assert cfg["format_version"] == 2 and cfg["tensors"][DOWN] == {
        "kind": "cols",
        "shape": [32, 64],
        "count": 3,
    }
    back = sg.Delta.load(tmp_path / "d")
    assert back.shapes == d.shapes and set(back.rows) == {Q, EMB} and set(back.cols) == {DOWN}
    for kind in ("rows", "cols"):
        for n, (i, b) in d.blocks(kind).items():
            assert torch.equal(back.blocks(kind)[n][0], i) and torch.equal(back.blocks(kind)[n][1], b)


def test_a_3d_tensor_rows_roundtrip(tmp_path):
    idx, block = torch.tensor([0, 5]), torch.randn(2, 3, 4)
    d = sg.Delta(rows={"conv.weight": (idx, block)}, shapes={"conv.weight": (6, 3, 4)})
    d.save(tmp_path / "d")
    assert torch.equal(sg.Delta.load(tmp_path / "d").rows["conv.weight"][1], block)
    dense = d.to_dense().dense["conv.weight"]
    assert torch.equal(dense[[0, 5]], block) and not dense[[1, 2, 3, 4]].any()


def test_apply_revert_restore_every_bit_and_the_base_is_still_recognised(bert):
    before, fp = _params(bert), model_fingerprint(bert)
    many = tuple(range(0, 32, 2))  # half the rows: the fingerprint's samples fall inside the block
    d = _rows_delta(bert, rows=many, cols=tuple(range(0, 64, 2)), tokens=tuple(range(0, 100, 3)))
    with sg.applied(bert, d):
        changed = _params(bert)
        assert not torch.equal(changed[Q][2], before[Q][2]) and torch.equal(changed[Q][3], before[Q][3])
        assert torch.equal(changed[DOWN][:, 1], before[DOWN][:, 1])
        torch.testing.assert_close(changed[DOWN][:, 2], before[DOWN][:, 2] + d.cols[DOWN][1][:, 1])
        assert model_fingerprint(bert) == fp  # the saved blocks stand in for the changed values
        with sg.applied(bert, _rows_delta(bert, seed=1)):  # stacked: the base check still passes
            pass
        assert all(torch.equal(p, changed[n]) for n, p in bert.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in bert.named_parameters())


def test_trained_rows_and_columns_reproduce_the_model_bit_for_bit_after_a_file_trip(tmp_path):
    model = tiny_bert()
    sel = {Q: torch.tensor([0, 3, 17]), UP: torch.tensor([5, 6, 60]), EMB: torch.tensor([1, 7, 42, 80])}
    shapes = {n: tuple(model.get_parameter(n).shape) for n in [*sel, DOWN, "classifier.weight"]}
    plan = Plan(
        rows={n: sel[n] for n in (Q, UP, EMB)},
        cols={DOWN: torch.tensor([2, 40])},
        dense=["classifier.weight"],
        shapes=shapes,
        meta={"method": "manual"},
    )
    sg.prepare(model, plan)
    sg.fit(model, cls_batches(n=3), max_steps=3, lr=1e-2, show=False)
    delta = sg.extract(model)
    assert set(delta.rows) == {Q, UP, EMB} and set(delta.cols) == {DOWN} and not delta.entries
    assert delta.rows[EMB][1].shape == (4, 32) and delta.cols[DOWN][1].shape == (32, 2)
    sg.unprepare(model)
    delta.save(tmp_path / "d")
    base = tiny_bert()
    sg.apply(base, sg.Delta.load(tmp_path / "d"))
    trained = dict(model.named_parameters())
    for n, p in base.named_parameters():
        assert torch.equal(p, trained[n]), n


def test_composition_commutes_and_overlapping_rows_add(bert):
    a, b = _rows_delta(bert, seed=1), _rows_delta(bert, seed=2, rows=(4, 5), cols=(2, 10), tokens=(3,))
    b.full.clear()
    ab, ba = a + b, b + a
    for kind in ("rows", "cols"):
        for n in ab.blocks(kind):
            assert torch.equal(ab.blocks(kind)[n][0], ba.blocks(kind)[n][0])
            torch.testing.assert_close(ab.blocks(kind)[n][1], ba.blocks(kind)[n][1], rtol=0, atol=0)
    assert ab.rows[Q][0].tolist() == [1, 4, 5, 9, 31]
    torch.testing.assert_close(ab.rows[Q][1][1], a.rows[Q][1][1] + b.rows[Q][1][0])  # row 4 in both
    assert ab.cols[DOWN][0].tolist() == [0, 2, 10, 63]
    dense = (a.to_dense() + b.to_dense()).dense
    for n in (Q, EMB, DOWN):
        torch.testing.assert_close(ab.to_dense().dense[n], dense[n])
    three = sg.compose([a, b, a], weights=[0.5, 1.0, 0.5])
    torch.testing.assert_close(three.to_dense().dense[Q], dense[Q])


def test_mixed_kinds_on_one_tensor_add_in_a_kind_that_holds_both(bert):
    rows = _rows_delta(bert)
    rows.full.clear()
    cols = sg.Delta(cols={Q: (torch.tensor([3]), torch.ones(32, 1))}, shapes={Q: (32, 32)}, meta=rows.meta)
    entries = sg.Delta(
        entries={Q: (torch.tensor([0, 40]), torch.ones(2))}, shapes={Q: (32, 32)}, meta=rows.meta
    )
    dense = sg.Delta(dense={Q: torch.ones(32, 32)}, shapes={Q: (32, 32)}, meta=rows.meta)
    for other, kind in ((cols, "entries"), (entries, "entries"), (dense, "dense")):
        for total in (rows + other, other + rows):
            assert total.kind_of(Q) == kind
            want = rows.to_dense().dense[Q] + other.to_dense().dense[Q]
            torch.testing.assert_close(total.to_dense().dense[Q], want)


def test_scale_prune_and_compress_of_blocks(bert):
    d = _rows_delta(bert)
    torch.testing.assert_close((2 * d).rows[Q][1], d.rows[Q][1] * 2)
    assert torch.equal((2 * d).full["classifier.bias"], d.full["classifier.bias"])
    pruned = d.prune(0.25)  # the largest quarter of a block is no block any more
    assert pruned.kind_of(Q) == "entries" and pruned.entries[Q][0].numel() == round(0.25 * 4 * 32)
    flat = d.rows[Q][1].reshape(-1)
    assert pruned.entries[Q][1].abs().min() >= flat.abs().kthvalue(flat.numel() - 32).values
    assert d.prune(1.0).kind_of(Q) == "rows"
    signed = d.compress(1.0, "sign").cols[DOWN][1]
    assert signed.shape == (32, 3) and signed.abs().unique().numel() == 1


def test_rows_in_bfloat16_cost_about_two_bytes_per_value(tmp_path):
    """4% of the rows of 30 weights of 1536x576 (a LoRA-sized row plan), config included."""
    g = torch.Generator().manual_seed(0)
    d = sg.Delta()
    for layer in range(30):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        idx = torch.randperm(1536, generator=g)[:61].sort().values
        d.rows[name], d.shapes[name] = (idx, torch.randn(61, 576, generator=g) * 1e-3), (1536, 576)
    d.save(tmp_path / "d", dtype="bfloat16")
    size = sum(f.stat().st_size for f in (tmp_path / "d").iterdir())
    per_value = size / d.num_values
    print(f"bytes per value (rows, bf16, config included): {per_value:.4f}")
    assert per_value <= 2.03


def _corrupt(directory: Path, key: str, fn) -> None:
    f = directory / "delta.safetensors"
    tensors = load_file(str(f))
    tensors[key] = fn(tensors[key])
    save_file(tensors, str(f))


def test_out_of_range_and_corrupted_row_indices_name_the_file(bert, tmp_path):
    d = _rows_delta(bert)
    target = tmp_path / "d"
    d.save(target)
    _corrupt(target, f"rows.{Q}.gaps", lambda g: torch.cat([g[:-1], torch.tensor([100], dtype=g.dtype)]))
    with pytest.raises(sg.SurgicalError, match=r"d/delta.safetensors.*corrupted.*beyond its shape"):
        sg.Delta.load(target)
    d.save(target)
    _corrupt(target, f"cols.{DOWN}.values", lambda v: v[:-1])
    with pytest.raises(sg.SurgicalError, match=r"d/delta.safetensors.*corrupted"):
        sg.Delta.load(target)
    d.save(target)
    cfg = json.loads((target / "delta_config.json").read_text())
    cfg["format_version"] = 1  # format 1 has no rows: a file claiming so is inconsistent
    (target / "delta_config.json").write_text(json.dumps(cfg))
    with pytest.raises(sg.SurgicalError, match="unknown kind 'rows'"):
        sg.Delta.load(target)


def test_validate_catches_malformed_blocks(bert):
    d = _rows_delta(bert)
    d.rows[Q] = (torch.tensor([4, 1]), d.rows[Q][1][:2])
    with pytest.raises(sg.SurgicalError, match="rows.*not sorted"):
        d.validate()
    d = _rows_delta(bert)
    d.cols["classifier.bias"] = (torch.tensor([0]), torch.zeros(2, 1))
    del d.full["classifier.bias"]
    with pytest.raises(sg.SurgicalError, match="columns need a 2-D weight"):
        d.validate()
    d = _rows_delta(bert)
    d.rows[EMB] = (torch.tensor([3, 100]), torch.zeros(2, 32))
    with pytest.raises(sg.SurgicalError, match="beyond its shape"):
        sg.apply(bert, d)


def test_format_1_files_still_load_and_entries_only_deltas_stay_format_1(tmp_path):
    """``tests/fixtures/delta_format1`` was written by the format-1 writer (commit 251d30a)."""
    old = sg.Delta.load(Path(__file__).parents[2] / "fixtures" / "delta_format1")
    assert old.entries["a.weight"][0].tolist() == [0, 5, 70000]
    assert old.entries["a.weight"][1].tolist() == [0.5, -1.25, 2.0]
    assert old.dense["b.bias"].tolist() == [0.5, -0.25, 0.125, 1.0]
    assert torch.equal(old.full["head.weight"], torch.arange(6.0).reshape(2, 3))
    old.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "delta_config.json").read_text())["format_version"] == 1


def test_inspect_counts_rows_and_columns(bert):
    rows = {r["name"]: r for r in tensor_rows(_rows_delta(bert))}
    assert rows[Q]["kind"] == "rows" and rows[Q]["units"] == 4 and rows[Q]["count"] == 4 * 32
    assert rows[DOWN]["kind"] == "cols" and rows[DOWN]["share"] == pytest.approx(3 / 64)
    assert rows["classifier.bias"]["units"] is None
    layers, modules, grid = layer_grid(_rows_delta(bert))
    assert grid[layers.index(0), modules.index("attention.self.query")] == pytest.approx(4 / 32)
