"""Deltas from elsewhere: the difference of two checkpoints, and PEFT LoRA adapters.

Models fine-tuned by any tool enter the same workflow (inspect, compose, compress, serve by
switching) once they are a :class:`~surgical.delta.Delta`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.fingerprint import base_identity
from surgical.delta.algebra import topk_entries
from surgical.delta.base import check_base
from surgical.delta.container import DeltaData

_PREFIX = "base_model.model."


@torch.no_grad()
def from_models(
    cls: type[DeltaData], base: nn.Module, finetuned: nn.Module, density: float | None = None
) -> DeltaData:
    """The delta that turns ``base`` into ``finetuned``.

    A parameter that ``finetuned`` has in another shape (or that ``base`` lacks), such as a new
    classification head, is stored in full. Others are stored as their difference: dense when
    ``density`` is None, else the ``density`` share of each tensor's changes largest in
    magnitude (sparse entries). Unchanged tensors are left out. With ``density=None`` and
    float32 weights, applying the delta to ``base`` gives back ``finetuned`` (exactly when the
    two differ by less than a factor 2 per value, as fine-tuning does; otherwise to rounding).

    Raises:
        SurgicalError: if ``density`` is outside (0, 1].
    """
    if density is not None and not 0.0 < density <= 1.0:
        raise SurgicalError(f"density must be in (0, 1], got {density}", "Pass e.g. density=0.01, or None")
    base_params = dict(base.named_parameters())
    delta = cls()
    for name, p in finetuned.named_parameters():
        delta.shapes[name] = tuple(p.shape)
        b = base_params.get(name)
        if b is None or tuple(b.shape) != tuple(p.shape):
            delta.full[name] = p.detach().float().cpu().clone()
            continue
        diff = p.detach().float().cpu() - b.detach().float().cpu()
        if not bool(diff.any()):
            del delta.shapes[name]
        elif density is None:
            delta.dense[name] = diff
        else:
            delta.entries[name] = topk_entries(None, diff, density)
    delta.meta = {
        "base": base_identity(base, exclude=[n for n in delta.full if n in base_params]),
        "source": {
            "from_models": str(getattr(getattr(finetuned, "config", None), "_name_or_path", "") or "")
        },
    }
    delta.meta["source"]["density"] = density
    return delta


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: the first key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def from_peft_lora(cls: type[DeltaData], directory: str | Path, base: nn.Module | None = None) -> DeltaData:
    """A delta from a PEFT LoRA adapter directory: ``B @ A * scaling`` per layer, as dense tensors.

    Reads only ``adapter_config.json`` and ``adapter_model.safetensors`` (no pickle, no code).
    ``modules_to_save`` tensors (e.g. a trained head) become replaced tensors. Pass ``base`` to
    record its fingerprint, so that applying to another model is caught.

    Raises:
        SurgicalError: for missing or corrupted files, or adapters that are not plain LoRA
            (DoRA, other PEFT methods).
    """
    directory = Path(directory)
    cfg_path, st_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    for f in (cfg_path, st_path):
        if not f.is_file():
            raise SurgicalError(
                f"{str(f)!r} is missing", "Pass a PEFT adapter directory saved with safetensors"
            )
    try:
        cfg = json.loads(cfg_path.read_text())
        tensors = load_file(str(st_path))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError, ValueError) as e:
        raise SurgicalError(
            f"{str(directory)!r} holds a corrupted adapter ({e})", "Save the adapter again"
        ) from None
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        kind = f"{cfg.get('peft_type')}{' (DoRA)' if cfg.get('use_dora') else ''}"
        raise SurgicalError(
            f"{str(directory)!r} is a {kind} adapter",
            "Only plain LoRA adapters can be imported; merge others with PEFT and use DeltaData.from_models",
        )
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    delta = cls()
    modules = sorted({k[: k.index(".lora_")] for k in tensors if ".lora_" in k})
    for key in modules:
        module = key.removeprefix(_PREFIX)
        r = _pattern_value(cfg.get("rank_pattern") or {}, module, r0)
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, alpha0)
        scaling = alpha / (r**0.5 if cfg.get("use_rslora") else r)
        if f"{key}.lora_A.weight" in tensors:
            a, b = tensors[f"{key}.lora_A.weight"].float(), tensors[f"{key}.lora_B.weight"].float()
            if a.dim() != 2 or b.dim() != 2:
                raise SurgicalError(f"LoRA on {module!r} is not on a Linear layer", "Import Linear LoRA only")
            w = (b @ a) * scaling
            if cfg.get("fan_in_fan_out"):
                w = w.T
        elif f"{key}.lora_embedding_A" in tensors:
            a, b = tensors[f"{key}.lora_embedding_A"].float(), tensors[f"{key}.lora_embedding_B"].float()
            w = (b @ a).T * scaling
        else:
            raise SurgicalError(f"cannot read the LoRA tensors of {module!r}", "Save the adapter again")
        name = f"{module}.weight"
        delta.dense[name], delta.shapes[name] = w.contiguous(), tuple(w.shape)
        if f"{key}.lora_B.bias" in tensors:  # lora_bias=True trains a bias on B
            delta.dense[f"{module}.bias"] = tensors[f"{key}.lora_B.bias"].float() * scaling
            delta.shapes[f"{module}.bias"] = tuple(delta.dense[f"{module}.bias"].shape)
    for key, t in tensors.items():
        if ".lora_" not in key:
            name = key.removeprefix(_PREFIX).replace(".modules_to_save.default.", ".")
            delta.full[name], delta.shapes[name] = t.float(), tuple(t.shape)
    delta.validate()
    source = {"peft_lora": str(directory), "r": r0, "lora_alpha": alpha0}
    if base is not None:
        check_base(base, delta, force=True)
        delta.meta = {"base": base_identity(base, exclude=delta.full), "source": source}
    else:
        delta.meta = {"base": {"name_or_path": cfg.get("base_model_name_or_path") or ""}, "source": source}
    return delta
