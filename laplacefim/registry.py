"""Named registries: the one place where structures, likelihoods and layer rules are listed.

A registry maps a name (a structure, a likelihood) or a module type (a layer rule) to its
implementation. Looking up an unknown name raises a ``ValueError`` that lists the valid
ones, so every option is validated once, at the API boundary.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Implementations by name, in registration order.

    Args:
        option: The name of the option the registry serves, for error messages.

    Example:
        >>> STRUCTURES = Registry[type]("structure")
        >>> STRUCTURES.register("diag", Diagonal)
        >>> STRUCTURES.get("diag")
    """

    def __init__(self, option: str) -> None:
        self.option = option
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``.

        Raises:
            ValueError: If ``name`` is taken.
        """
        if name in self._entries:
            raise ValueError(f"{self.option} {name!r} is already registered.")
        self._entries[name] = entry
        return entry

    def get(self, name: object) -> T:
        """The entry named ``name``.

        Raises:
            ValueError: If no entry has that name; the message lists the valid names.
        """
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        raise ValueError(f"{self.option}={name!r} is not valid; expected one of {self.names}.")

    @property
    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._entries)

    def entries(self) -> list[T]:
        """The registered entries, in registration order."""
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
