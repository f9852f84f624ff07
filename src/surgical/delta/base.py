"""Which base a delta belongs to: the checks a model must pass before a delta touches it."""

from __future__ import annotations

from torch import nn

from surgical.core.errors import SurgicalError
from surgical.core.fingerprint import model_fingerprint
from surgical.delta.container import DeltaData


def base_checks(delta: DeltaData) -> list[tuple[str, tuple[str, ...]]]:
    """The (fingerprint, excluded parameter names) pairs a base must match to receive ``delta``."""
    base = delta.meta.get("base", {}) or {}
    if "checks" in base:
        return [(str(fp), tuple(ex)) for fp, ex in base["checks"]]
    if base.get("fingerprint") and "fingerprint_excludes" in base:
        return [(str(base["fingerprint"]), tuple(base["fingerprint_excludes"]))]
    return []


def check_base(model: nn.Module, delta: DeltaData, force: bool = False) -> None:
    """Raises a SurgicalError unless ``model`` has the delta's parameters, shapes and base identity.

    ``force`` skips the identity (fingerprint) check; names and shapes are always checked.
    """
    params = dict(model.named_parameters())
    for name, shape in delta.shapes.items():
        if name not in params:
            raise SurgicalError(
                f"the delta changes {name!r}, which this model does not have",
                "Apply the delta to the base model it was trained from",
            )
        if tuple(params[name].shape) != tuple(shape):
            raise SurgicalError(
                f"the delta was trained on another model: {name!r} is {tuple(shape)} in the delta "
                f"but {tuple(params[name].shape)} here",
                "Apply the delta to the base model it was trained from",
            )
    for expected, excludes in [] if force else base_checks(delta):
        got = model_fingerprint(model, excludes)
        if got != expected:
            base_name = delta.meta.get("base", {}).get("name_or_path") or "?"
            here = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "?")
            raise SurgicalError(
                f"this model ({here}, fingerprint {got}) is not the base the delta was trained on "
                f"({base_name}, fingerprint {expected})",
                "Load the right base model, or pass force=True / --force to apply anyway",
            )
