"""Process-level helpers: peak memory, progress bars, quieting transformers."""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def plain_console(**kwargs) -> Console:
    """A rich Console that prints text as it is: markup is off, so a path, a key or a dataset's
    text holding square brackets (``data[v1].csv``, ``[/b]``) is printed, never parsed or dropped.
    Tables and progress bars render as usual; a print that means markup says ``markup=True``."""
    return Console(markup=False, **kwargs)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes: since the start, or since the last
    successful :func:`reset_peak_rss`."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Starts :func:`peak_rss_bytes` afresh from the current resident size (Linux only).

    Lets a measurement leave out a transient peak that came before it, such as the one of
    loading a model. Returns False where the kernel offers no way to do it.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def progress(disable: bool = False) -> Progress:
    """A rich progress bar with the columns used across the library."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=disable,
        transient=False,
    )


def quiet_transformers() -> None:
    """Silences transformers' info/warning chatter (e.g. "newly initialized weights")."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class _DropImportNoise(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_optional_imports() -> None:
    """Drops the warnings that importing torchao logs, before anything imports it.

    transformers imports torchao whenever it is installed (the ``quant`` extra), and on a machine
    without its CUDA kernels torchao logs one "Failed to load" warning per optional kernel and
    torch one deprecation warning per Enum torchao registers: four lines on stderr before any
    output of a command, which would bury a one-line error. bitsandbytes (imported by peft, which
    transformers' trainer utilities import) logs that the optional ``kernels`` package is absent;
    its built-in CPU path is the one surgical uses. Only those records are dropped.
    """
    logging.getLogger("torchao").addFilter(_DropImportNoise("Failed to load"))
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropImportNoise("Failed to load CPU"))
    logging.getLogger("torch.utils._pytree").addFilter(_DropImportNoise("%s is an Enum subclass"))
