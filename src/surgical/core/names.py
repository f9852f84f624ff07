"""Finding transformer blocks and attention heads from parameter names and the model config.

A *layer* is a transformer block, recognised by a numbered container in the parameter name:
``layers.N.`` (Llama, Mistral), ``layer.N.`` (BERT), ``h.N.`` (GPT-2), ``blocks.N.`` /
``block.N.`` (ViT-like, T5). Parameters outside any block (embeddings, pooler, heads) belong
to no layer.
"""

from __future__ import annotations

import re

from torch import nn

from surgical.core.errors import SurgicalError

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")

# (suffix, kind): rows of the query/key/value projections and columns of the output projection
# hold one head each, in blocks of head_dim.
_HEAD_TENSORS = (
    ("q_proj.weight", "rows"),
    ("k_proj.weight", "rows"),
    ("v_proj.weight", "rows"),
    ("o_proj.weight", "cols"),
    ("attention.self.query.weight", "rows"),
    ("attention.self.key.weight", "rows"),
    ("attention.self.value.weight", "rows"),
    ("attention.output.dense.weight", "cols"),
    ("attention.query.weight", "rows"),
    ("attention.key.weight", "rows"),
    ("attention.value.weight", "rows"),
)


def split_layer(name: str) -> tuple[str | None, str]:
    """Splits a parameter name into (block prefix such as ``"model.layers.3"``, tensor type).

    The tensor type is the rest of the name without ``.weight`` (``"self_attn.q_proj"``); a
    parameter outside any block gives ``(None, name)``.
    """
    matches = list(_LAYER.finditer(name))
    if not matches:
        return None, name
    m = matches[-1]
    prefix = name[: m.end() - 1]
    rest = name[m.end() :]
    if rest.endswith(".weight"):
        rest = rest[: -len(".weight")]
    return prefix, rest


def layer_index(prefix: str) -> int:
    """The block number at the end of a prefix from :func:`split_layer`."""
    return int(prefix.rsplit(".", 1)[1])


def head_dim(model: nn.Module) -> int:
    """The attention head size from the model config (``head_dim`` or hidden / heads)."""
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    hd = getattr(cfg, "head_dim", None)
    if hd is None and heads:
        hidden = getattr(cfg, "hidden_size", None)
        hd = hidden // heads if hidden else None
    if not hd:
        raise SurgicalError(
            "head granularity needs a config with num_attention_heads (or head_dim)",
            "Use granularity='row' for this model",
        )
    return int(hd)


def head_kind(name: str) -> str | None:
    """``"rows"`` for a query/key/value weight, ``"cols"`` for an attention output, else None."""
    for suffix, kind in _HEAD_TENSORS:
        if name.endswith(suffix):
            return kind
    return None
