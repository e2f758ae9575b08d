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


# ---------------------------------------------------------------------------------------------
# References: user code named by an import path or a file path instead of a registered name


def is_reference(name: str) -> bool:
    """Whether `name` names user code ("pkg.mod:Attr" or "path/to/file.py:Attr") rather than a registered name."""
    return isinstance(name, str) and ":" in name


def _names_a_file(where: str) -> bool:
    """Whether the part of a reference before ":" is a file path (else a module's import path)."""
    import os

    return where.endswith(".py") or "/" in where or os.sep in where


def reference_source(ref: str):
    """The source file a reference names (a Path), found without running it: the file of
    "path/to/file.py:Attr", the module's file of "pkg.module:Attr" (importlib imports its parent
    packages to find it); None when there is no such file."""
    import importlib.util
    from pathlib import Path

    where = ref.rpartition(":")[0]
    if _names_a_file(where):
        path = Path(where).expanduser()
    else:
        try:
            origin = importlib.util.find_spec(where).origin
        except (ImportError, AttributeError, ValueError):
            origin = None
        path = Path(origin) if origin else None
    return path if path is not None and path.is_file() else None


def load_reference(ref: str, key: str) -> Any:
    """The object a reference names: "pkg.module:Attr" (imported) or "path/to/file.py:Attr" (a file run as a
    module, relative paths from the working directory; its folder joins the end of sys.path so that it can
    import its neighbours). `Attr` may be dotted. Anything wrong is one OptionError naming `key` (the config
    key) and the reference: a missing file or module, an error while importing it, a missing attribute."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    where, _, attr = ref.rpartition(":")
    if not where or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise OptionError(f"config key '{key}': {ref!r} is not a reference; write module.path:Name or path/to/file.py:Name")
    if _names_a_file(where):
        path = Path(where).expanduser()
        if not path.is_file():
            raise OptionError(f"config key '{key}': file {where} {'is not a file' if path.exists() else 'does not exist'} "
                              f"(from {ref!r}; relative paths start at {Path.cwd()})")
        path = path.resolve()
        name = "tracerl_user_" + "".join(c if c.isalnum() else "_" for c in str(path.with_suffix("")))[-120:]
        module = sys.modules.get(name)
        if module is None:
            if str(path.parent) not in sys.path:
                sys.path.append(str(path.parent))
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # before it runs: dataclasses and pickle look their module up
            try:
                spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise OptionError(f"config key '{key}': loading {where} raised {type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:160]}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise OptionError(f"config key '{key}': cannot import {where!r} ({e}) from {ref!r}") from None
        except Exception as e:
            raise OptionError(f"config key '{key}': importing {where} raised {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:160]}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise OptionError(f"config key '{key}': {where} has no attribute {part!r} (from {ref!r})")
        obj = getattr(obj, part)
    return obj
