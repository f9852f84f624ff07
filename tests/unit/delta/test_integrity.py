"""Delta files carry the SHA-256 of their tensors, and every stored dtype is checked on load."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch

import surgical as sg

FIXTURE = Path(__file__).parents[2] / "fixtures" / "delta_format1"


def _delta() -> sg.Delta:
    g = torch.Generator().manual_seed(0)
    return sg.Delta(
        entries={"a.weight": (torch.tensor([1, 7, 70_000, 200_000]), torch.randn(4, generator=g))},
        rows={"r.weight": (torch.tensor([0, 3]), torch.randn(2, 5, generator=g))},
        dense={"d.weight": torch.randn(4, 3, generator=g, dtype=torch.float64)},  # float32 cannot hold it
        full={"head.bias": torch.randn(3, generator=g)},
        shapes={"a.weight": (500, 500), "r.weight": (6, 5), "d.weight": (4, 3), "head.bias": (3,)},
        meta={"base": {"name_or_path": "x"}},
    )


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def rewrite_dtype(path: Path, key: str, dtype: str) -> None:
    """Rewrites the header dtype of tensor ``key`` in place (same byte size, so the file parses)."""
    raw = path.read_bytes()
    n, header = _header(path)
    header[key]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(raw[:8] + text.ljust(n, b" ") + raw[8 + n :])


def flip_data_byte(path: Path, key: str) -> None:
    """Flips the lowest bits of the first byte of tensor ``key``'s data (a float stays finite)."""
    raw = bytearray(path.read_bytes())
    n, header = _header(path)
    at = 8 + n + header[key]["data_offsets"][0]
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8", "sign"])
def test_save_records_the_sha256_of_the_tensor_file_and_load_checks_it(tmp_path, dtype):
    _delta().save(tmp_path / "d", dtype=dtype)
    config = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    tensors = tmp_path / "d" / "delta.safetensors"
    assert config["sha256"] == hashlib.sha256(tensors.read_bytes()).hexdigest()
    back = sg.Delta.load(tmp_path / "d")
    assert "sha256" not in back.meta and back.meta == {"base": {"name_or_path": "x"}}
    # a re-save of a loaded delta records the checksum of its own new file
    back.save(tmp_path / "again", dtype=dtype)
    again = json.loads((tmp_path / "again" / "delta_config.json").read_text())
    assert (
        again["sha256"] == hashlib.sha256((tmp_path / "again" / "delta.safetensors").read_bytes()).hexdigest()
    )


def test_a_float64_dense_change_is_legitimate(tmp_path):
    _delta().save(tmp_path / "d")
    back = sg.Delta.load(tmp_path / "d")
    assert back.dense["d.weight"].dtype == torch.float64
    assert torch.equal(back.dense["d.weight"], _delta().dense["d.weight"])


@pytest.mark.parametrize("key", ["entries.a.weight.values", "rows.r.weight.values", "full.head.bias"])
def test_flipped_value_bytes_are_a_checksum_mismatch(tmp_path, key):
    _delta().save(tmp_path / "d")
    f = tmp_path / "d" / "delta.safetensors"
    flip_data_byte(f, key)
    with pytest.raises(sg.SurgicalError) as e:
        sg.Delta.load(tmp_path / "d")
    assert str(e.value) == f"{str(f)!r} is corrupted (checksum mismatch). Save it again"
    assert "\n" not in str(e.value)


def test_files_without_a_checksum_still_load(tmp_path):
    assert "sha256" not in json.loads((FIXTURE / "delta_config.json").read_text())
    old = sg.Delta.load(FIXTURE)
    assert old.num_entries == 3 and set(old.dense) == {"b.bias"} and set(old.full) == {"head.weight"}
    _delta().save(tmp_path / "d")
    cfg_path = tmp_path / "d" / "delta_config.json"
    config = json.loads(cfg_path.read_text())
    del config["sha256"]  # as written before checksums were recorded
    cfg_path.write_text(json.dumps(config))
    flip_data_byte(tmp_path / "d" / "delta.safetensors", "entries.a.weight.values")
    assert sg.Delta.load(tmp_path / "d").num_entries == 4  # nothing to check it against


@pytest.mark.parametrize("recorded", ["abc", 12, ["x"], "0" * 64])
def test_a_malformed_or_wrong_recorded_checksum_is_corruption(tmp_path, recorded):
    _delta().save(tmp_path / "d")
    cfg_path = tmp_path / "d" / "delta_config.json"
    config = json.loads(cfg_path.read_text())
    config["sha256"] = recorded
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(sg.SurgicalError, match=r"delta.safetensors' is corrupted \("):
        sg.Delta.load(tmp_path / "d")


# (codec, tensor, dtype written into the header instead): each keeps the byte size, so the file
# still parses and only the dtype check can tell
REWRITES = [
    ("float32", "entries.a.weight.values", "I32"),
    ("float32", "rows.r.weight.values", "U32"),
    ("float32", "full.head.bias", "I32"),
    ("float32", "dense.d.weight.fix", "I64"),
    ("float32", "entries.a.weight.gaps", "F16"),
    ("float32", "entries.a.weight.overflow", "F64"),
    ("float16", "entries.a.weight.values", "BF16"),
    ("bfloat16", "full.head.bias", "F16"),
    ("int8", "entries.a.weight.values", "U8"),
    ("int8", "entries.a.weight.scale", "I32"),
    ("sign", "rows.r.weight.values", "I8"),
    ("sign", "rows.r.weight.scale", "U32"),
]


@pytest.mark.parametrize("codec, key, dtype", REWRITES, ids=[f"{c}-{k}-{d}" for c, k, d in REWRITES])
def test_a_rewritten_header_dtype_is_refused_naming_the_tensor(tmp_path, codec, key, dtype):
    _delta().save(tmp_path / "d", dtype=codec)
    rewrite_dtype(tmp_path / "d" / "delta.safetensors", key, dtype)
    with pytest.raises(sg.SurgicalError) as e:
        sg.Delta.load(tmp_path / "d")
    message = str(e.value)
    assert f"tensor {key!r} is stored as" in message and "corrupted" in message and "\n" not in message


def test_a_dtype_rewrite_is_refused_even_without_a_checksum(tmp_path):
    _delta().save(tmp_path / "d")
    cfg_path = tmp_path / "d" / "delta_config.json"
    config = json.loads(cfg_path.read_text())
    del config["sha256"]
    cfg_path.write_text(json.dumps(config))
    rewrite_dtype(tmp_path / "d" / "delta.safetensors", "entries.a.weight.values", "I32")
    with pytest.raises(
        sg.SurgicalError, match=r"'entries.a.weight.values' is stored as int32, expected float32"
    ):
        sg.Delta.load(tmp_path / "d")


def test_a_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _delta().save(tmp_path / "d")
    f = tmp_path / "d" / "delta.safetensors"
    tensors = load_file(str(f))
    del tensors["entries.a.weight.overflow"]
    save_file(tensors, str(f))
    with pytest.raises(sg.SurgicalError, match=r"'entries.a.weight.overflow' is missing"):
        sg.Delta.load(tmp_path / "d")
