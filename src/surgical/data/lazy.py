"""Causal-LM batches tokenized on access: memory that does not grow with the dataset's tokens.

:class:`LazyBatches` is a ``Sequence`` of batches (``len``, indexing, iteration), so it goes
wherever a list of batches goes (:func:`surgical.fit` reuses it every epoch in a seeded order).
It holds the examples' source (a list, a ``datasets.Dataset``) and an index, never a token:

- without packing, the numbers of the examples that keep a target after truncation (8 bytes
  each);
- with packing, the kept examples' numbers and their offsets in the concatenated token stream,
  and the numbers of the packed rows that keep a target (8 bytes each).

The index is made by one pass that tokenizes every example and keeps only those numbers, the
first time the length or a batch is asked for (so a malformed example anywhere is reported
before training starts, as when every batch was built up front); each batch is tokenized again
when asked for. The batches equal, tensor for tensor, those
:func:`surgical.data.instruct.causal_batches` builds in memory from the same examples.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import torch

from surgical.core.errors import SurgicalError
from surgical.data.chat import chat_pair
from surgical.data.instruct import (
    IGNORE_INDEX,
    has_target,
    instruction_example,
    pad_batches,
    pad_id,
    truncated_away,
)

Encode = Callable[[Any, int], tuple[list[int], list[int]]]


class BatchSequence(Sequence[dict[str, torch.Tensor]]):
    """A sequence of batches built when indexed (integers, negative ones, slices) or iterated;
    subclasses give ``__len__`` and ``_batch(i)`` for ``0 <= i < len``."""

    def _batch(self, i: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]: ...
    @overload
    def __getitem__(self, i: slice) -> list[dict[str, torch.Tensor]]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"batch {i} of {n}")
        return self._batch(i % n)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(len(self)):
            yield self[i]


class BatchesOf(BatchSequence):
    """``count`` batches, batch ``i`` made by ``make(i)`` each time it is asked for."""

    def __init__(self, count: int, make: Callable[[int], dict[str, torch.Tensor]]) -> None:
        self.count, self.make = count, make

    def __len__(self) -> int:
        return self.count

    def _batch(self, i: int) -> dict[str, torch.Tensor]:
        return self.make(i)


class LazyBatches(BatchSequence):
    """Right-padded causal-LM batches of ``items``, each tokenized by ``encode`` when asked for.

    Args:
        items: The examples, any sequence (``len`` and integer indexing).
        encode: ``(item, number) -> (input ids, labels)``, untruncated (labels
            ``IGNORE_INDEX`` where there is no loss). Must be deterministic: the index made
            from one pass is used to find the examples of a batch in later ones.
        batch_size: Examples (or packed rows) per batch.
        max_length: Tokens per example (truncated from the right) or per packed row.
        pad: The id of padding tokens.
        packing: Concatenate the examples and cut the stream into rows of ``max_length``.
        what: What a target is, for the error when truncation leaves none ("answer").
    """

    def __init__(
        self,
        items: Sequence[Any],
        encode: Encode,
        batch_size: int,
        max_length: int,
        pad: int,
        *,
        packing: bool = False,
        what: str = "target",
    ) -> None:
        if batch_size < 1 or max_length < 1:
            raise SurgicalError(
                f"batch_size and max_length must be at least 1, got {batch_size} and {max_length}",
                "Pass positive numbers",
            )
        self.items, self.encode = items, encode
        self.batch_size, self.max_length, self.pad = batch_size, max_length, pad
        self.packing, self.what = packing, what
        self._kept: array | None = None  # numbers of the kept examples
        self._starts = array("q")  # packing: each kept example's offset in the token stream
        self._rows = array("q")  # packing: numbers of the packed rows that keep a target
        self._total = 0  # packing: tokens in the stream

    def _index(self) -> array:
        if self._kept is not None:
            return self._kept
        kept, starts, rows = array("q"), array("q"), array("q")
        total, cut = 0, None if self.packing else self.max_length
        for n in range(len(self.items)):
            _, labels = self.encode(self.items[n], n)
            if not has_target(labels[:cut]):
                continue
            kept.append(n)
            if self.packing:
                starts.append(total)
                for j, x in enumerate(labels):  # a target counts unless it opens its row
                    at = total + j
                    if (
                        x != IGNORE_INDEX
                        and at % self.max_length
                        and not (rows and rows[-1] == at // self.max_length)
                    ):
                        rows.append(at // self.max_length)
                total += len(labels)
        if not (rows if self.packing else kept):
            raise truncated_away(self.what)
        self._starts, self._rows, self._total = starts, rows, total
        self._kept = kept
        return kept

    def _units(self) -> int:
        """Examples (or packed rows) in all."""
        kept = self._index()
        return len(self._rows) if self.packing else len(kept)

    def __len__(self) -> int:
        return -(-self._units() // self.batch_size)

    def _batch(self, i: int) -> dict[str, torch.Tensor]:
        lo, hi = i * self.batch_size, (i + 1) * self.batch_size
        if self.packing:
            return pad_batches(self._packed(self._rows[lo:hi]), self.batch_size, self.pad)[0]
        examples = []
        for k in self._index()[lo:hi]:
            ids, labels = self.encode(self.items[k], k)
            examples.append((ids[: self.max_length], labels[: self.max_length]))
        return pad_batches(examples, self.batch_size, self.pad)[0]

    def _packed(self, rows: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        """The packed rows ``rows``: the slices of the examples that overlap each."""
        kept, starts, done = self._index(), self._starts, {}
        out = []
        for r in rows:
            lo, hi = r * self.max_length, min((r + 1) * self.max_length, self._total)
            ids: list[int] = []
            labels: list[int] = []
            k = bisect_right(starts, lo) - 1
            while k < len(kept) and starts[k] < hi:
                if k not in done:
                    done[k] = self.encode(self.items[kept[k]], kept[k])
                    end = starts[k + 1] if k + 1 < len(kept) else self._total
                    if len(done[k][1]) != end - starts[k]:
                        raise SurgicalError(
                            f"example {kept[k] + 1} tokenized differently from when the batches were indexed",
                            "Keep the data and the tokenizer unchanged while training",
                        )
                e_ids, e_labels = done[k]
                a, b = max(lo - starts[k], 0), hi - starts[k]
                ids += e_ids[a:b]
                labels += e_labels[a:b]
                k += 1
            out.append((ids, labels))
        return out

    def __repr__(self) -> str:
        state = f"{len(self)} batches" if self._kept is not None else "not indexed yet"
        return f"LazyBatches({len(self.items)} examples, batch_size={self.batch_size}, {state})"


def lazy_chat_batches(
    tokenizer,
    conversations: Sequence[Any],
    batch_size: int,
    max_length: int,
    *,
    packing: bool = False,
    column: str | None = None,
) -> LazyBatches:
    """The batches of :func:`surgical.data.chat.chat_batches`, tokenized when asked for.

    ``conversations`` is any sequence (a list, a ``datasets.Dataset``); with ``column``, each
    item is a row whose ``column`` holds the conversation.
    """
    if not len(conversations):
        raise SurgicalError("the chat data is empty", "Pass at least one conversation")

    def encode(item: Any, n: int) -> tuple[list[int], list[int]]:
        return chat_pair(tokenizer, item if column is None else item[column], n)

    return LazyBatches(
        conversations, encode, batch_size, max_length, pad_id(tokenizer), packing=packing, what="answer"
    )


def lazy_instruction_batches(
    tokenizer,
    rows: Sequence[Any],
    batch_size: int,
    max_length: int,
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    packing: bool = False,
    clean: Callable[[str], str] = str,
) -> LazyBatches:
    """The batches of :func:`surgical.data.instruct.instruction_batches` over rows holding a
    prompt and a response column, tokenized when asked for; ``clean`` maps each text first."""
    if not len(rows):
        raise SurgicalError("instruction data is empty", "Pass at least one prompt/response pair")

    def encode(row: Any, n: int) -> tuple[list[int], list[int]]:
        return instruction_example(
            tokenizer, clean(str(row[prompt_column])), clean(str(row[response_column]))
        )

    return LazyBatches(
        rows, encode, batch_size, max_length, pad_id(tokenizer), packing=packing, what="response"
    )
