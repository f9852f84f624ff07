"""Registries: everything chosen by name (criteria, schedules, merge methods, data criteria,
export formats), each entry declaring its options.

An entry is registered with a decorator on a plain function or class::

    @CRITERIA.register("fisher", help="...", options=[Option("labels", str, "data", "...",
                       choices=("data", "sampled"))])
    def fisher_scores(ctx): ...

Declared options make the checks uniform: :meth:`Registry.resolve` fills defaults, coerces
values to the declared type, checks choices and ranges, and rejects unknown options with one
line listing the known ones, so no implementation reads its options by hand. ``--keys`` and
``surgical list`` print them, and a conformance test iterates every entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from surgical.core.errors import SurgicalError

T = TypeVar("T")


@dataclass(frozen=True)
class Option:
    """One declared option of a registered entry.

    Attributes:
        name: The option's key (the same in Python, YAML and on the command line).
        type: ``int``, ``float``, ``str`` or ``bool``.
        default: The value used when the option is not given (None: optional, no value).
        help: One line for ``--keys`` and the docs.
        choices: Allowed values, if the option is an enumeration.
        low: Smallest allowed value of a number (inclusive unless ``low_open``).
        high: Largest allowed value of a number (inclusive unless ``high_open``).
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def range_text(self) -> str:
        """The allowed range as text (``(0, 1]``, ``>= 1``), or ``""``."""
        if self.low is not None and self.high is not None:
            return (
                f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            )
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return ""

    def check(self, value: Any, where: str) -> Any:
        """``value`` coerced to the declared type and checked, or a SurgicalError naming ``where``."""
        if value is None and self.default is None:
            return None
        value = coerce(value, self.type, where)
        if self.choices is not None and value not in self.choices:
            raise SurgicalError(
                f"{where} must be one of {', '.join(map(str, self.choices))}, got {value!r}",
                f"Pass one of them ({self.help})",
            )
        if self.type in (int, float):
            check_range(value, where, self.low, self.high, self.low_open, self.high_open)
        return value

    def describe(self) -> str:
        """``name (type, default X, choices/range): help``."""
        bits = [self.type.__name__, f"default {self.default!r}"]
        if self.choices:
            bits.append("one of " + "/".join(map(str, self.choices)))
        if self.range_text():
            bits.append(self.range_text())
        return f"{self.name} ({', '.join(bits)}): {self.help}"


def coerce(value: Any, tp: type, where: str) -> Any:
    """``value`` as ``tp`` (int, float, str or bool) or a SurgicalError naming ``where``.

    Numbers written as strings (``"1e-3"``, which YAML reads as a string) become numbers; a bool
    is never a number; an integral float is accepted as an int.
    """
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise SurgicalError(f"{where} must be true or false, got {value!r}", "Fix the value")
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if tp is float else int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            kind = "an integer" if tp is int else "a number"
            raise SurgicalError(f"{where} must be {kind}, got {value!r}", "Fix the value")
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise SurgicalError(f"{where} must be an integer, got {value!r}", "Fix the value")
            return int(value)
        if not math.isfinite(float(value)):
            raise SurgicalError(f"{where} must be a finite number, got {value!r}", "Fix the value")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise SurgicalError(f"{where} must be a string, got {value!r}", "Fix the value")
        return str(value)
    return value


def check_range(
    value: float,
    where: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises a SurgicalError naming ``where`` unless ``value`` lies in the range."""
    bad = (
        (low is not None and (value < low or (low_open and value == low)))
        or (high is not None and (value > high or (high_open and value == high)))
        or (isinstance(value, float) and math.isnan(value))
    )
    if bad:
        rng = Option("", float, 0, "", low=low, high=high, low_open=low_open, high_open=high_open)
        raise SurgicalError(f"{where} must be {_range_words(rng)}, got {value!r}", "Fix the value")


def _range_words(o: Option) -> str:
    text = o.range_text()
    return f"in {text}" if text.startswith(("(", "[")) else text


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered implementation with its declared options and extra attributes."""

    name: str
    obj: T
    help: str
    options: tuple[Option, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def option(self, name: str) -> Option | None:
        """The declared option called ``name``, or None."""
        return next((o for o in self.options if o.name == name), None)


class Registry(Generic[T]):
    """Maps names to implementations with declared options; registration is by decorator.

    Args:
        kind: What the registry holds ("selection criterion", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, *, help: str = "", options: Sequence[Option] = (), **extra: Any
    ) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name`` (names are unique).

        Args:
            name: The name users choose it by.
            help: One line describing it (default: the first line of the docstring).
            options: The options it takes; nothing else is accepted.
            **extra: Attributes the registry's users read (e.g. a criterion's granularity).
        """

        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            text = help or ((getattr(obj, "__doc__", None) or "").strip().splitlines() or [""])[0]
            self._entries[name] = Entry(name, obj, text, tuple(options), dict(extra))
            return obj

        return deco

    def entry(self, name: str) -> Entry[T]:
        """The entry for ``name`` or a SurgicalError listing known names."""
        try:
            return self._entries[name]
        except KeyError:
            raise SurgicalError(
                f"unknown {self.kind} {name!r}", f"Use one of: {', '.join(self.names())}"
            ) from None

    def get(self, name: str) -> T:
        """The implementation for ``name`` or a SurgicalError listing known names."""
        return self.entry(name).obj

    def resolve(self, name: str, given: Mapping[str, Any] | None = None, where: str = "") -> dict[str, Any]:
        """``given`` options of ``name`` checked and completed with the defaults.

        Args:
            name: A registered name.
            given: Options set by the user.
            where: How to name an option in errors (e.g. ``selection.options.``); default
                ``<kind> <name> option ``.

        Raises:
            SurgicalError: an unknown name, an unknown option (listing the known ones), or a
                value of the wrong type or outside its range.
        """
        entry = self.entry(name)
        given = dict(given or {})
        unknown = sorted(set(given) - {o.name for o in entry.options})
        if unknown:
            known = ", ".join(o.name for o in entry.options) or "none"
            raise SurgicalError(
                f"unknown option(s) {', '.join(unknown)} for {self.kind} {name!r}",
                f"Its options are: {known}",
            )
        out = {}
        for o in entry.options:
            label = f"{where}{o.name}" if where else f"option {o.name!r} of {self.kind} {name!r}"
            out[o.name] = o.check(given[o.name], label) if o.name in given else o.default
        return out

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def entries(self) -> Iterable[Entry[T]]:
        """Every entry, by name."""
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def describe(self) -> list[str]:
        """Lines for ``--keys`` / ``surgical list``: each name, its help and its options."""
        lines = []
        for e in self.entries():
            lines.append(f"{e.name}: {e.help}")
            lines.extend(f"    {o.describe()}" for o in e.options)
        return lines
