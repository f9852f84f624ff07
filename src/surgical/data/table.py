"""Reading tabular data from files, ``save_to_disk`` directories and Hugging Face datasets objects.

Accepted sources (:data:`FORMS`): a ``.csv`` file, a JSON-lines file (``.jsonl``/``.json``), a
``.parquet`` or ``.arrow`` file, a directory written by ``Dataset.save_to_disk`` or
``DatasetDict.save_to_disk`` (a split is picked from a ``DatasetDict``), or an in-memory
``datasets.Dataset``/``DatasetDict``. Every source is read into rows first and then goes through
the same checks (:func:`_checked`), so the errors for an empty table or a missing column read
the same whatever the format.

Nothing here touches the network: a string that is not an existing path is an error, never a
Hub dataset name. ``HF_DATASETS_OFFLINE`` is set (unless the user set it) before ``datasets`` is
imported, and only its local readers are used. ``datasets`` is imported only for the formats
that need it, so CSV and JSON-lines readers do not pay its import time.
"""

from __future__ import annotations

import csv
import json
import os
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from surgical.core.errors import SurgicalError

FORMS = "a .csv, .jsonl/.json, .parquet or .arrow file, or a directory written by datasets' save_to_disk"


def load_table(
    source: Any, columns: Sequence[str], *, split: str = "train", limit: int | None = None
) -> list[dict[str, Any]]:
    """Reads ``source`` into rows (dicts keyed by column) and checks that ``columns`` are present.

    Args:
        source: A path (str or Path) of one of :data:`FORMS`, or a ``datasets.Dataset`` /
            ``datasets.DatasetDict``.
        columns: Columns every row must have. Datasets sources are read with only these
            columns, so unused wide columns cost nothing.
        split: The split to read when the source is a ``DatasetDict`` (ignored otherwise).
        limit: Read only the first ``limit`` rows (None: all).

    Returns:
        At most ``limit`` rows, in the source's order, each with at least ``columns``.

    Raises:
        SurgicalError: if the source does not exist or cannot be read, the split is missing
            (naming the available ones), the table has no rows, or a column is missing.
    """
    where = describe(source, split)
    names, rows = _read(source, columns, split, limit)
    return _checked(where, names, rows, columns)


def describe(source: Any, split: str = "train") -> str:
    """How errors name ``source``: ``data file 'x.csv'``, ``dataset 'dir'`` or ``the dataset``."""
    if isinstance(source, (str, Path)):
        return f"{'dataset' if Path(source).is_dir() else 'data file'} {str(source)!r}"
    return "the dataset"


def _checked(
    where: str, names: Sequence[str], rows: list[dict[str, Any]], columns: Sequence[str]
) -> list[dict[str, Any]]:
    """The checks every format ends in: at least one row, and every row has every column."""
    if not rows:
        raise SurgicalError(f"{where} has no rows", "Pass a non-empty dataset")
    _check_columns(where, names, columns)
    # JSON lines may differ from row to row; a later row without a column would fail far away
    bad = next((i for i, r in enumerate(rows) if any(c not in r for c in columns)), None)
    if bad is not None:
        lacking = ", ".join(c for c in columns if c not in rows[bad])
        raise SurgicalError(f"row {bad + 1} of {where} lacks column(s) {lacking}", "Fix that row")
    return rows


def _read(
    source: Any, columns: Sequence[str], split: str, limit: int | None
) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows) of any accepted source, before any check."""
    data = _as_dataset(source, split)
    if data is not None:
        return _from_dataset(data, columns, limit)
    path = Path(source)
    try:
        if path.suffix in (".jsonl", ".json"):
            with open(path) as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
            if not all(isinstance(r, dict) for r in rows):
                raise ValueError("every line must be a JSON object")
        else:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
    except (ValueError, csv.Error, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise SurgicalError(f"cannot parse {str(path)!r}: {e}", "Check the file's format") from None
    rows = rows[:limit]
    return (list(rows[0]) if rows else []), rows


def _check_columns(where: str, names: Sequence[str], columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise SurgicalError(
            f"{where} lacks column(s) {', '.join(missing)} (it has {', '.join(names)})",
            "Rename the columns or pass the right column names",
        )


def _as_dataset(source: Any, split: str):
    """The ``datasets.Dataset`` of a source ``datasets`` reads; None for CSV and JSON lines."""
    if not isinstance(source, (str, Path)):
        return _pick_split(source, split, "the dataset")
    path = Path(source)
    if not str(source) or not path.exists():
        raise SurgicalError(f"data path {str(source)!r} does not exist", f"Pass {FORMS}")
    if path.is_dir():
        return _load_from_disk(path, split)
    if path.suffix in (".parquet", ".arrow"):
        return _load_file(path)
    return None


def open_table(
    source: Any, columns: Sequence[str], *, split: str = "train", limit: int | None = None
) -> Sequence[dict[str, Any]]:
    """The rows of ``source``, checked as :func:`load_table` checks them, without holding every
    row in memory: for the sources ``datasets`` reads, a ``datasets.Dataset`` of ``columns``
    (memory-mapped for Arrow files and ``save_to_disk`` directories) whose rows are read when
    indexed; for CSV and JSON lines, :class:`FileRows` (each row's byte offset, 8 bytes a row, the
    row parsed again when indexed). Every row is parsed once here, for the checks.

    Raises:
        SurgicalError: as :func:`load_table`.
    """
    data = _as_dataset(source, split)
    if data is None:
        return FileRows(Path(source), columns, limit)
    where = describe(source, split)
    if limit is not None:
        data = data.select(range(min(max(limit, 0), len(data))))
    if len(data) == 0:
        raise SurgicalError(f"{where} has no rows", "Pass a non-empty dataset")
    _check_columns(where, list(data.column_names), columns)
    return data.select_columns(list(columns))


def _datasets():
    """The ``datasets`` module, imported offline."""
    # read at import time by datasets; only local readers are used below either way
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise SurgicalError(
            "reading Parquet, Arrow or save_to_disk data needs the `datasets` package",
            "Run `pip install datasets`",
        ) from None
    return datasets


def _load_from_disk(path: Path, split: str):
    ds = _datasets()
    try:
        loaded = ds.load_from_disk(str(path))
    except (OSError, ValueError) as e:  # FileNotFoundError: not a save_to_disk directory
        raise SurgicalError(
            f"cannot read dataset directory {str(path)!r}: {str(e).splitlines()[0]}", f"Pass {FORMS}"
        ) from None
    except IndexError:  # datasets (5.x) cannot load a dataset saved with no rows (no shards)
        raise SurgicalError(
            f"dataset {str(path)!r} has no rows (in some split)", "Pass a non-empty dataset"
        ) from None
    except (KeyError, TypeError, AttributeError) as e:  # its JSON lacks what datasets expects
        raise SurgicalError(
            f"cannot read dataset directory {str(path)!r}: its metadata is incomplete or damaged "
            f"({type(e).__name__}: {e})",
            "Save it again with save_to_disk",
        ) from None
    return _pick_split(loaded, split, f"dataset {str(path)!r}")


def _load_file(path: Path):
    """A ``datasets.Dataset`` over a Parquet file or an Arrow file (stream or IPC file format)."""
    ds = _datasets()
    import pyarrow as pa
    import pyarrow.ipc
    import pyarrow.parquet

    try:
        if path.suffix == ".parquet":
            # read directly: Dataset.from_parquet would write a cache copy under ~/.cache
            return ds.Dataset(pyarrow.parquet.read_table(str(path)))
        try:
            return ds.Dataset.from_file(str(path))  # the stream format save_to_disk writes
        except pa.ArrowInvalid:
            with pa.memory_map(str(path)) as fh:
                return ds.Dataset(pyarrow.ipc.open_file(fh).read_all())
    except (OSError, pa.ArrowException) as e:
        raise SurgicalError(f"cannot parse {str(path)!r}: {e}", "Check the file's format") from None


def _pick_split(data: Any, split: str, where: str):
    """``data[split]`` for a DatasetDict (an error listing the splits if absent), else ``data``."""
    ds = _datasets()
    if isinstance(data, ds.DatasetDict):
        if split not in data:
            raise SurgicalError(
                f"{where} has no split {split!r} (it has {', '.join(data) or 'none'})",
                "Pass one of them as the split (data.split in a train config, --split for select)",
            )
        return data[split]
    if not isinstance(data, ds.Dataset):
        raise SurgicalError(
            f"cannot read data of type {type(data).__name__}", f"Pass a datasets.Dataset or {FORMS}"
        )
    return data


def _from_dataset(data: Any, columns: Sequence[str], limit: int | None) -> tuple[list[str], list[dict]]:
    """(column names, rows) of a ``datasets.Dataset``, reading only ``columns`` and ``limit`` rows."""
    names = list(data.column_names)
    if limit is not None:
        data = data.select(range(min(max(limit, 0), len(data))))
    # keep one column even when none asked for exists, so an empty table still reads as empty
    keep = [c for c in columns if c in names] or names[:1]
    return names, data.select_columns(keep).to_list()


class FileRows(Sequence):
    """The rows of a CSV or JSON-lines file, read from disk when indexed (``open_table``).

    One pass at construction parses every row (the same checks and messages as
    :func:`load_table`) and keeps only where each row starts in the file (a CSV row may span
    lines inside quotes); ``rows[i]`` seeks there and parses that row again. Each row is a dict
    restricted to ``columns``.
    """

    def __init__(self, path: Path, columns: Sequence[str], limit: int | None = None) -> None:
        self.path, self.columns = path, list(columns)
        self.json = path.suffix in (".jsonl", ".json")
        self.offsets = array("q")
        where = describe(path)
        names: list[str] = []
        try:
            with open(path, "rb") as fh:
                if not self.json:
                    header = next(csv.reader(_lines(fh, [0])), None)
                    names = header or []
                for i, (start, row) in enumerate(self._scan(fh, names)):
                    if limit is not None and i >= limit:
                        break
                    if i == 0 and self.json:
                        names = list(row)
                    if any(c not in row for c in self.columns):
                        _check_columns(where, names, self.columns)  # the header (or first row) first
                        lacking = ", ".join(c for c in self.columns if c not in row)
                        raise SurgicalError(
                            f"row {i + 1} of {where} lacks column(s) {lacking}", "Fix that row"
                        )
                    self.offsets.append(start)
        except (ValueError, csv.Error, UnicodeDecodeError) as e:
            raise SurgicalError(f"cannot parse {str(path)!r}: {e}", "Check the file's format") from None
        if not self.offsets:
            raise SurgicalError(f"{where} has no rows", "Pass a non-empty dataset")
        self.names = names

    def _scan(self, fh, names: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(byte offset, row) of every row from the file position on."""
        where = [fh.tell()]
        if self.json:
            for line in iter(fh.readline, b""):
                start, where[0] = where[0], where[0] + len(line)
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("every line must be a JSON object")
                    yield start, row
            return
        start = where[0]
        for values in csv.reader(_lines(fh, where)):
            if values:  # blank lines are skipped, as csv.DictReader does
                yield start, _as_row(names, values)
            start = where[0]

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        with open(self.path, "rb") as fh:
            fh.seek(self.offsets[i])
            if self.json:
                row = json.loads(fh.readline())
            else:
                row = _as_row(self.names, next(csv.reader(_lines(fh, [self.offsets[i]]))))
        return {c: row[c] for c in self.columns}


def _as_row(names: list[str], values: list[str]) -> dict[str, Any]:
    """A CSV row as csv.DictReader gives it: a short row's missing values are None."""
    return {name: values[k] if k < len(values) else None for k, name in enumerate(names)}


def _lines(fh, where: list[int]) -> Iterator[str]:
    """The file's lines decoded as UTF-8 (newlines kept, as the csv module needs), advancing
    ``where[0]`` to the byte after each line handed out."""
    for line in iter(fh.readline, b""):
        where[0] += len(line)
        yield line.decode("utf-8")
