"""Names at the edge, values inside: one registry per kind of option.

Configs name things (a sigmoid, a CI function, a loss term, a schedule, an experiment); a
:class:`Registry` turns such a name into the value the library calls, once, at the config
boundary. Inside the library only values travel, so a researcher can pass a function or object of
their own wherever a registered one is accepted. Every registry rejects an unknown name with the
list of valid ones, and :func:`resolve` accepts either a name or a value.
"""

from __future__ import annotations

from typing import Generic, Iterator, Mapping, TypeVar

T = TypeVar("T")


class Registry(Generic[T], Mapping[str, T]):
    """A read-mostly ``{name: value}`` map for one kind of option (``kind`` names it in errors)."""

    def __init__(self, kind: str, entries: Mapping[str, T] | None = None):
        self.kind = kind
        self._entries: dict[str, T] = dict(entries or {})

    def register(self, name: str, value: T) -> T:
        """Adds ``value`` under ``name`` (refuses to shadow an existing entry) and returns it."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered.")
        self._entries[name] = value
        return value

    def get(self, name: str) -> T:  # type: ignore[override]
        """The value registered as ``name``; a ``ValueError`` listing the choices otherwise."""
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"Unknown {self.kind} {name!r}; "
                             f"expected one of {sorted(self._entries)}.")
        return self._entries[name]

    def resolve(self, name_or_value: str | T) -> T:
        """A registered value for a name; anything else is taken to be a value already."""
        return self.get(name_or_value) if isinstance(name_or_value, str) else name_or_value

    def name_of(self, value: T) -> str | None:
        """The name ``value`` is registered under, or None for a user-supplied value."""
        return next((k for k, v in self._entries.items() if v is value), None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"
