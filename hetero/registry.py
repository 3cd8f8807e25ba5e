"""One registry per extension axis (backbones, losses, exporters, runners), timm-style."""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from hetero.errors import HeteroError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories. Registering a name twice is an error."""

    def __init__(self, axis: str):
        self.axis = axis
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            key = name or fn.__name__
            if key in self._items:
                raise ValueError(f"{self.axis} {key!r} is already registered")
            self._items[key] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._items:
            known = ", ".join(sorted(self._items))
            raise HeteroError(f"unknown {self.axis} {name!r}; choose one of: {known}")
        return self._items[name]

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self._items if n.startswith(prefix))

    def registered(self) -> list[str]:
        """Names in registration order (e.g. exporters: sources before what is made from them)."""
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
