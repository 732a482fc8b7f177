"""Explicit plug-in registries (PEFT-style): register once, build by name with typed options."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from shared.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> (config dataclass, factory). Duplicate names raise; unknown names list the known."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._entries: dict[str, tuple[type[Any], Callable[[Any], T]]] = {}

    def register(self, name: str, config_cls: type[Any], factory: Callable[[Any], T]) -> None:
        """Add a plug-in; a second registration of the same name is a KeyError."""
        if name in self._entries:
            raise KeyError(f"there is already a {self._kind} called {name!r}")
        self._entries[name] = (config_cls, factory)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def config(self, name: str, options: Mapping[str, Any] | None = None) -> Any:
        """Build the config dataclass of `name` from options, naming any unknown option."""
        config_cls, _ = self._lookup(name)
        options = dict(options or {})
        if dataclasses.is_dataclass(config_cls):
            known = {f.name for f in dataclasses.fields(config_cls)}
            unknown = sorted(set(options) - known)
            if unknown:
                raise ConfigError(
                    f"unknown option(s) {unknown} for {self._kind} {name!r}; valid: {sorted(known)}"
                )
        try:
            return config_cls(**options)
        except TypeError as e:
            raise ConfigError(f"bad options for {self._kind} {name!r}: {e}") from None

    def build(self, name: str, options: Mapping[str, Any] | None = None) -> T:
        """Instantiate plug-in `name` with its validated config."""
        _, factory = self._lookup(name)
        return factory(self.config(name, options))

    def _lookup(self, name: str) -> tuple[type[Any], Callable[[Any], T]]:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self._kind} {name!r}; known: {self.names()}"
            ) from None
