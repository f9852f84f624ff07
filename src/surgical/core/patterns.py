"""Matching parameter names against user patterns (globs, or regexes prefixed with ``re:``)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from surgical.core.errors import SurgicalError


def matches(name: str, pattern: str) -> bool:
    """Whether a parameter ``name`` matches ``pattern``.

    A pattern is a glob matched against the whole dotted name or any dotted part of it, so
    ``"query"`` matches ``encoder.layer.0.attention.self.query.weight`` and ``"layer.0.*"``
    matches everything in layer 0. A pattern starting with ``re:`` is a regular expression
    searched anywhere in the name.
    """
    if pattern.startswith("re:"):
        try:
            return re.search(pattern[3:], name) is not None
        except re.error as e:
            raise SurgicalError(
                f"pattern {pattern!r} is not a valid regular expression ({e})", "Fix the pattern"
            ) from None
    return (
        fnmatchcase(name, pattern)
        or fnmatchcase(name, f"*.{pattern}")
        or fnmatchcase(name, f"{pattern}.*")
        or fnmatchcase(name, f"*.{pattern}.*")
    )


def as_patterns(patterns: str | Sequence[str] | None) -> list[str]:
    """Normalises ``None``, one pattern, or a list of patterns (comma-separated allowed)."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for p in patterns:
        out.extend(q.strip() for q in (p.split(",") if not p.startswith("re:") else [p]))
    return [p for p in out if p]


def select_names(
    names: Iterable[str], patterns: Sequence[str], what: str, noun: str = "parameter"
) -> list[str]:
    """Names matching any pattern; a pattern that matches none of ``names`` is an error."""
    names = list(names)
    chosen: list[str] = []
    for pat in patterns:
        hit = [n for n in names if matches(n, pat)]
        if not hit:
            example = names[0] if names else "<none>"
            raise SurgicalError(
                f"{what} pattern {pat!r} matches no {noun}",
                f"Use a glob over parameter names such as {example!r} (or 're:REGEX')",
            )
        chosen.extend(n for n in hit if n not in chosen)
    return chosen
