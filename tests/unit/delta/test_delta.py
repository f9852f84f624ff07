"""Delta files: compact indices, exact round trips, safe loading of damaged files."""

from __future__ import annotations

import json

import pytest
import torch

import surgical as sg
from conftest import tiny_bert
from surgical.core.codec import decode_indices, encode_indices


def _delta(seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(200_000, generator=g)[:2000].sort().values
    big = torch.tensor([5, 70_000, 300_000, 300_001])  # gaps beyond 16 bits
    return sg.Delta(
        entries={
            "a.weight": (idx, torch.randn(2000, generator=g)),
            "b.weight": (big, torch.randn(4, generator=g)),
        },
        full={"head.bias": torch.randn(3, generator=g)},
        shapes={"a.weight": (400, 500), "b.weight": (1000, 1000), "head.bias": (3,)},
        meta={"base": {"name_or_path": "x", "fingerprint": "abc"}},
    )


@pytest.mark.parametrize(
    "indices",
    [[], [0], [65534], [65535], [65536], [0, 1, 2], [3, 65539, 65540, 10**9], list(range(0, 10**6, 65536))],
)
def test_codec_roundtrip(indices):
    idx = torch.tensor(indices, dtype=torch.int64)
    gaps, overflow = encode_indices(idx)
    assert gaps.dtype == torch.int16 and gaps.numel() == idx.numel()
    assert torch.equal(decode_indices(gaps, overflow), idx)


def test_codec_rejects_unsorted():
    with pytest.raises(ValueError):
        encode_indices(torch.tensor([3, 1]))


def test_save_load_roundtrip_exact(tmp_path):
    d = _delta()
    d.save(tmp_path / "d")
    back = sg.Delta.load(tmp_path / "d")
    assert back.shapes == d.shapes and back.meta == d.meta
    for n, (i, v) in d.entries.items():
        assert torch.equal(back.entries[n][0], i) and torch.equal(back.entries[n][1], v)
    assert torch.equal(back.full["head.bias"], d.full["head.bias"])


def test_index_storage_is_two_bytes_per_entry(tmp_path):
    d = sg.Delta(entries={"w": (torch.arange(0, 10**6, 100), torch.ones(10**4))}, shapes={"w": (1000, 1000)})
    d.save(tmp_path / "d", dtype="bfloat16")
    size = (tmp_path / "d" / "delta.safetensors").stat().st_size
    assert size < 10**4 * 4 + 1024  # 2 bytes of index + 2 of bf16 value, plus a small header


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_values(tmp_path, dtype):
    d = _delta()
    d.save(tmp_path / "d", dtype=dtype)
    back = sg.Delta.load(tmp_path / "d")
    want = d.entries["a.weight"][1].to(getattr(torch, dtype)).float()
    assert torch.equal(back.entries["a.weight"][1], want)


def test_missing_and_truncated_files_are_clear_errors(tmp_path):
    with pytest.raises(sg.SurgicalError, match="does not exist"):
        sg.Delta.load(tmp_path / "nope")
    d = tmp_path / "d"
    _delta().save(d)
    f = d / "delta.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(sg.SurgicalError, match="truncated or corrupted"):
        sg.Delta.load(d)
    _delta().save(d)
    (d / "delta_config.json").write_text('{"format_version": 1, "tens')
    with pytest.raises(sg.SurgicalError, match="delta_config.json.*truncated or corrupted"):
        sg.Delta.load(d)
    _delta().save(d)
    (d / "delta.safetensors").unlink()
    with pytest.raises(sg.SurgicalError, match="is missing"):
        sg.Delta.load(d)


def test_nan_values_refused(tmp_path):
    d = _delta()
    d.entries["a.weight"][1][3] = float("nan")
    with pytest.raises(sg.SurgicalError, match="NaN or Inf"):
        d.save(tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_failed_save_keeps_the_old_delta(tmp_path, monkeypatch):
    target = tmp_path / "d"
    _delta(seed=1).save(target)
    before = (target / "delta.safetensors").read_bytes()
    import surgical.delta.delta as mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mod, "save_file", boom)
    with pytest.raises(RuntimeError):
        _delta(seed=2).save(target)
    assert (target / "delta.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp directory left behind
    assert json.loads((target / "delta_config.json").read_text())["format_version"] == 1


def test_save_never_replaces_a_file_or_another_kind_of_directory(tmp_path):
    """A delta or plan replaces only an earlier one (or an empty directory), atomically."""
    data = tmp_path / "train.csv"
    data.write_text("text,label\na,0\n")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "important.txt").write_text("keep me")
    plan = sg.select(tiny_bert(), None, method="random", density=0.1, progress=False)
    for save, kind in ((_delta().save, "delta"), (plan.save, "plan")):
        with pytest.raises(sg.SurgicalError, match=rf"'{data}' is an existing file, not a {kind} directory"):
            save(data)
        with pytest.raises(sg.SurgicalError, match=rf"exists and is not a {kind} directory \(it holds other"):
            save(other)
        (tmp_path / f"empty-{kind}").mkdir()
        save(tmp_path / f"empty-{kind}")  # an empty directory, then an earlier one of the same kind
        save(tmp_path / f"empty-{kind}")
    assert data.read_text() == "text,label\na,0\n" and (other / "important.txt").read_text() == "keep me"
    with pytest.raises(sg.SurgicalError, match=r"train.csv' is a file, not a delta directory"):
        sg.Delta.load(data)
    with pytest.raises(sg.SurgicalError, match=r"train.csv' is a file, not a plan directory"):
        sg.Plan.load(data)
