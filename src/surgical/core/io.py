"""Atomic file writes: nothing already on disk is lost when a write fails or is interrupted."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary directory beside ``target``; on success it replaces ``target``.

    If the body raises, the temporary directory is removed and ``target`` is left untouched, so an
    interrupted save never leaves a half-written directory where a good one was.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):  # make the contents durable before the directory appears
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            old.rmdir()
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def dir_size(path: str | os.PathLike) -> int:
    """Total size in bytes of the files in a directory (not recursive)."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def atomic_save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Saves a matplotlib figure as PNG through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_output(out: str | os.PathLike, inputs: dict[str, str | os.PathLike], flag: str = "--out") -> Path:
    """``out`` as a Path, or a SurgicalError if writing it would overwrite or nest in an input.

    Args:
        out: The directory a command is about to write.
        inputs: What the command reads, by the name the user knows it under (``"base model"``).
        flag: How the user set ``out``, for the message.
    """
    from surgical.core.errors import SurgicalError

    target = Path(out).resolve()
    for label, path in inputs.items():
        src = Path(path).resolve()
        if target == src or src in target.parents or target in src.parents:
            raise SurgicalError(
                f"{flag} {str(out)!r} would overwrite the {label} {str(path)!r}",
                f"Write to a new directory ({flag} elsewhere); inputs are never overwritten",
            )
    return target


def check_replaceable(
    out: str | os.PathLike, markers: str | tuple[str, ...], kind: str, flag: str = "--out"
) -> Path:
    """``out`` as a Path, or a SurgicalError if writing it would destroy something else: an
    existing file, or a non-empty directory that holds none of ``markers`` (the files an earlier
    output of this ``kind`` holds). An empty directory, or an earlier output of the same kind,
    may be replaced (atomically, once the new one is complete).
    """
    from surgical.core.errors import SurgicalError

    path = Path(out)
    if not path.exists() and not path.is_symlink():
        return path
    names = (markers,) if isinstance(markers, str) else markers
    if not path.is_dir():
        raise SurgicalError(
            f"{flag} {str(out)!r} is an existing file, not a {kind} directory", f"Choose another {flag}"
        )
    if any(path.iterdir()) and not any((path / m).is_file() for m in names):
        raise SurgicalError(
            f"{flag} {str(out)!r} exists and is not a {kind} directory (it holds other files)",
            f"Choose another {flag}, or an empty or new directory",
        )
    return path


def check_png(path: str | os.PathLike, flag: str = "--png") -> Path:
    """``path`` as a Path, or a SurgicalError if writing a PNG there would destroy something: a
    directory, or an existing file that is not a PNG (a model's weights, a data file, a delta).
    An existing PNG is replaced atomically."""
    from surgical.core.errors import SurgicalError

    target = Path(path)
    if target.is_dir():
        raise SurgicalError(
            f"{flag} {str(path)!r} is a directory", f"Pass a file path such as {target / 'x.png'}"
        )
    if target.exists():
        with open(target, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                raise SurgicalError(
                    f"{flag} {str(path)!r} is an existing file that is not a PNG",
                    f"Choose another {flag}; only a PNG is replaced",
                )
    return target


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file's bytes, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: str | os.PathLike, expected: object) -> None:
    """Raises a one-line SurgicalError if ``path``'s SHA-256 is not ``expected``.

    ``expected`` comes from a JSON file beside ``path``; None (a file written before checksums
    were recorded) skips the check, anything that is not a hex digest is itself corruption.
    """
    from surgical.core.errors import SurgicalError

    if expected is None:
        return
    if not isinstance(expected, str) or len(expected) != 64:
        raise SurgicalError(f"{str(path)!r} is corrupted (its recorded sha256 is not one)", "Save it again")
    if sha256_file(path) != expected.lower():
        raise SurgicalError(f"{str(path)!r} is corrupted (checksum mismatch)", "Save it again")


def read_tensor_dir(
    directory: str | os.PathLike, info_file: str, tensor_file: str, what: str, fix: str
) -> tuple[Any, dict]:
    """(parsed JSON, tensors) of a directory of one JSON file and one safetensors file.

    Only JSON and safetensors are read (no pickle, no code). A missing directory or file, or a
    file that does not parse, is a one-line SurgicalError naming it (``what``: ``plan``,
    ``selection``...) with ``fix``.
    """
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from surgical.core.errors import SurgicalError

    directory = Path(directory)
    if not directory.is_dir():
        if directory.exists():
            raise SurgicalError(f"{str(directory)!r} is a file, not a {what} directory", fix)
        raise SurgicalError(f"{what} directory {str(directory)!r} does not exist", fix)
    for fname in (info_file, tensor_file):
        if not (directory / fname).is_file():  # safetensors' own error does not name the file
            raise SurgicalError(f"{what} file {str(directory / fname)!r} is missing", fix)
    try:
        info = json.loads((directory / info_file).read_text())
        tensors = load_file(str(directory / tensor_file))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as e:
        why = e.__class__.__name__ if isinstance(e, UnicodeDecodeError) else str(e)
        raise SurgicalError(f"{what} in {str(directory)!r} is truncated or corrupted ({why})", fix) from None
    return info, tensors
