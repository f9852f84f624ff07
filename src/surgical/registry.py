"""A small name -> implementation registry shared by criteria, merge methods and schedules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from surgical.errors import SurgicalError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to implementations; registration is by decorator.

    Args:
        kind: What the registry holds ("selection criterion", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers an implementation under ``name`` (names are unique)."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Returns the implementation for ``name`` or raises a SurgicalError listing known names."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise SurgicalError(f"unknown {self.kind} {name!r}", f"Use one of: {known}") from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
