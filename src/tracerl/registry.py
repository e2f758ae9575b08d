"""Name -> function registries (advantages, losses, aggregation, KL, allocators, credit rules, ...).

The trainer never branches on a method's name; it looks the name up here. What the rest of the code
must know about a method (does it need trees, does it use the success predictor, what normaliser
does it divide by) is declared where the method is registered, as traits:

    @ADVANTAGES.register("tree_grpo", needs_trees=True)
    def tree_grpo(...): ...

    ADVANTAGES.trait("tree_grpo", "needs_trees")   # True
    ALLOCATORS.having(makes_trees=False)           # names of the chain allocators

Every registry lists the traits it knows (with their defaults), so a misspelt trait fails at import.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Mapping, TypeVar

from tracerl.errors import OptionError

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    def __init__(self, kind: str, traits: Mapping[str, Any] | None = None):
        """`traits`: the traits a method of this kind may declare, with the value of one that does not."""
        self.kind = kind
        self.defaults: dict[str, Any] = dict(traits or {})
        self._items: dict[str, F] = {}
        self._traits: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **traits: Any) -> Callable[[F], F]:
        unknown = sorted(set(traits) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(f"{self.kind} {name!r}: unknown trait(s) {', '.join(unknown)} (known: {known})")

        def deco(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = fn
            self._traits[name] = {**self.defaults, **traits}
            return fn

        return deco

    def get(self, name: str) -> F:
        try:
            return self._items[name]
        except KeyError:
            raise OptionError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}") from None

    def traits(self, name: str) -> dict[str, Any]:
        self.get(name)  # the unknown-name error
        return dict(self._traits[name])

    def trait(self, name: str, key: str) -> Any:
        if key not in self.defaults:
            raise KeyError(f"{self.kind}: no trait {key!r} (known: {', '.join(sorted(self.defaults))})")
        return self.traits(name)[key]

    def having(self, **want: Any) -> list[str]:
        """Names whose traits equal every given value."""
        return [n for n in self.names() if all(self._traits[n].get(k) == v for k, v in want.items())]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
