"""Token rows of an embedding tied to an LM head, trained as one block.

With ``tie_word_embeddings`` (SmolLM2, Llama, GPT-2) the input embedding (``nn.Embedding``) and
the LM head (``nn.Linear``) share one weight ``W`` of shape (vocab, dim). It is one parameter, so
its selected token rows are one trainable block of shape (r, dim), registered on the embedding as
``weight_sg_delta`` and reported by ``named_parameters()`` once, beside the embedding's weight.

``W`` holds ``base + block`` at the selected rows (the in-place scheme of
:mod:`surgical.train.structured`), so both forwards stay plain: an embedding lookup and an
``F.linear``. The block's gradient is the sum of two contributions, each accumulated by autograd
into the same parameter:

- embedding: the output gradient ``index_add``-ed at the positions whose token is a selected row;
- LM head: the selected vocabulary columns of the logits gradient, ``gy[..., rows]^T @ x``.

Neither forms the dense (vocab, dim) weight gradient. The embedding owns the bookkeeping
(:class:`~surgical.train.structured.BlockState`, which ``extract`` reads like any row block); the
head carries a :class:`TiedHeadState` that forwards every sync to it, so ``W`` is written once per
change of the block, by whichever module runs first, and both modules see it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from surgical.core.errors import SurgicalError
from surgical.train.state import SparseState, install
from surgical.train.structured import BlockState, attach_block, block_linear


@dataclass
class TiedHeadState(SparseState):
    """Bookkeeping of an LM head whose weight is tied to a row-trained embedding (``owner``).

    It holds no tensors: the block, row indices and base rows live on ``owner``. ``dirty`` is
    set by the optimizer step hook like every state's, and handed on to the owner's state.
    """

    kind: ClassVar[str] = "tied"

    param_name: str
    owner: nn.Module
    dirty: bool = False

    def sync(self, module: nn.Module) -> None:
        """Writes the owner's ``base + block`` into the shared weight if the block changed."""
        state: BlockState = self.owner._sg_entries
        if self.dirty:
            state.dirty = True
            self.dirty = False
        state.sync(self.owner)


def _tied_head_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    head_state: TiedHeadState = module._sg_entries
    head_state.sync(module)
    owner = head_state.owner
    return block_linear(module, x, owner._sg_entries, owner)


def weight_users(model: nn.Module, weight: torch.Tensor) -> list[nn.Module]:
    """Every module of ``model`` whose ``weight`` is ``weight`` (more than one when tied)."""
    return [m for m in model.modules() if getattr(m, "weight", None) is weight]


def tied_row_owner(name: str, users: list[nn.Module], kind: str) -> nn.Module:
    """The embedding that trains ``name``'s rows for all ``users`` of a shared weight.

    Raises:
        SurgicalError: unless ``kind`` is ``"rows"`` and the users are one ``nn.Embedding`` and
            ``nn.Linear`` heads (the only sharing with a sparse path).
    """
    embeddings = [m for m in users if isinstance(m, nn.Embedding)]
    heads = [m for m in users if isinstance(m, nn.Linear)]
    if kind != "rows" or len(embeddings) != 1 or len(embeddings) + len(heads) != len(users):
        raise SurgicalError(
            f"{name!r} is shared by {len(users)} modules, and only token rows of an embedding tied "
            f"to an LM head train sparsely there (not {kind})",
            "Select rows of it (Plan.rows, granularity='row'), or train it densely (list it under 'always')",
        )
    return embeddings[0]


def attach_tied_rows(embedding: nn.Embedding, heads: list[nn.Module], sel: torch.Tensor) -> nn.Parameter:
    """Makes token rows ``sel`` of a weight shared by ``embedding`` and ``heads`` trainable.

    Returns the one (r, dim) block parameter, registered on ``embedding``; ``heads`` route their
    forward through it. :func:`surgical.train.state.detach` on the embedding undoes both.
    """
    block = attach_block(embedding, sel, axis=0)
    state: BlockState = embedding._sg_entries
    for head in heads:
        install(head, TiedHeadState(param_name="weight", owner=embedding), _tied_head_forward)
        state.tied.append(head)
    return block
