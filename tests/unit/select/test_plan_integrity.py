"""Plan files carry the SHA-256 of their tensors; dtypes and the JSON's structure are checked."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch

import surgical as sg


def _plan() -> sg.Plan:
    return sg.Plan(
        entries={"a.weight": torch.tensor([0, 5, 70_000, 200_000])},
        rows={"r.weight": torch.tensor([1, 4])},
        cols={"c.weight": torch.tensor([0, 2])},
        dense=["head.bias"],
        shapes={"a.weight": (500, 500), "r.weight": (6, 5), "c.weight": (3, 4), "head.bias": (3,)},
        meta={"method": "random"},
    )


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def _rewrite_dtype(path: Path, key: str, dtype: str) -> None:
    raw = path.read_bytes()
    n, header = _header(path)
    header[key]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(raw[:8] + text.ljust(n, b" ") + raw[8 + n :])


def _edit_json(directory: Path, edit) -> None:
    f = directory / "plan.json"
    f.write_text(json.dumps(edit(json.loads(f.read_text()))))


def test_save_records_the_sha256_and_the_plan_round_trips(tmp_path):
    _plan().save(tmp_path / "p")
    info = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert info["sha256"] == hashlib.sha256((tmp_path / "p" / "plan.safetensors").read_bytes()).hexdigest()
    back = sg.Plan.load(tmp_path / "p")
    assert back.meta == {"method": "random"} and back.dense == ["head.bias"]
    assert torch.equal(back.entries["a.weight"], _plan().entries["a.weight"])
    assert torch.equal(back.rows["r.weight"], _plan().rows["r.weight"])
    assert torch.equal(back.cols["c.weight"], _plan().cols["c.weight"])
    assert back.shapes == _plan().shapes


def test_changed_index_bytes_are_a_checksum_mismatch(tmp_path):
    _plan().save(tmp_path / "p")
    f = tmp_path / "p" / "plan.safetensors"
    raw = bytearray(f.read_bytes())
    n, header = _header(f)
    raw[8 + n + header["r.weight.rows"]["data_offsets"][0]] ^= 0x01  # row 1 -> row 0: still valid
    f.write_bytes(bytes(raw))
    with pytest.raises(sg.SurgicalError) as e:
        sg.Plan.load(tmp_path / "p")
    assert str(e.value) == f"{str(f)!r} is corrupted (checksum mismatch). Save it again"


def test_plans_without_a_checksum_still_load(tmp_path):
    _plan().save(tmp_path / "p")
    _edit_json(tmp_path / "p", lambda info: {k: v for k, v in info.items() if k != "sha256"})
    assert sg.Plan.load(tmp_path / "p").num_entries == 4 + 2 * 5 + 2 * 3


@pytest.mark.parametrize(
    "key, dtype, stored",
    [("a.weight.gaps", "F16", "float16"), ("a.weight.overflow", "F64", "float64"),
     ("r.weight.rows", "F64", "float64"), ("c.weight.cols", "U64", "uint64")],
)  # fmt: skip
def test_a_rewritten_header_dtype_is_refused_naming_the_tensor(tmp_path, key, dtype, stored):
    _plan().save(tmp_path / "p")
    _rewrite_dtype(tmp_path / "p" / "plan.safetensors", key, dtype)
    with pytest.raises(sg.SurgicalError) as e:
        sg.Plan.load(tmp_path / "p")
    assert f"tensor {key!r} is stored as {stored}" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda info: [info], "plan.json holds a list"),
        (lambda info: {k: v for k, v in info.items() if k != "shapes"}, "lacks 'shapes'"),
        (lambda info: {**info, "entries": {"a.weight": 5}}, "holds 4 indices, not 5"),
        (lambda info: {**info, "entries": {"zz.weight": 1}}, "'zz.weight.gaps' is missing"),
        (lambda info: {**info, "shapes": {"a.weight": "big"}}, "corrupted"),
        (lambda info: {**info, "dense": ["nowhere.bias"]}, "'nowhere.bias' has no shape"),
    ],
)
def test_a_malformed_plan_json_is_one_line(tmp_path, edit, needle):
    _plan().save(tmp_path / "p")
    _edit_json(tmp_path / "p", edit)
    with pytest.raises(sg.SurgicalError) as e:
        sg.Plan.load(tmp_path / "p")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_binary_or_missing_plan_file_is_one_line(tmp_path):
    _plan().save(tmp_path / "p")
    (tmp_path / "p" / "plan.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(sg.SurgicalError, match="truncated or corrupted"):
        sg.Plan.load(tmp_path / "p")
    _plan().save(tmp_path / "p")
    (tmp_path / "p" / "plan.safetensors").unlink()
    with pytest.raises(sg.SurgicalError, match="plan.safetensors' is missing"):
        sg.Plan.load(tmp_path / "p")
