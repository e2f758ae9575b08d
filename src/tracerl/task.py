"""One verifiable task instance: the prompt at the root of a rollout tree.

A bottom-layer module (no tracerl imports) so that rollout trees (`tracerl.tree`), allocators and
environments share the type without any of them importing another; `tracerl.envs.base` re-exports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SPLITS = ("train", "validation", "test", "heldout")  # every environment's splits


@dataclass(frozen=True)
class Task:
    """One verifiable task instance (a prompt / tree root)."""

    id: str
    question: str
    answers: tuple[str, ...]  # gold answer first, then aliases
    meta: dict[str, Any] = field(default_factory=dict)  # hops, template, supporting docs, split ...

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["answers"] = list(self.answers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Task":
        return cls(id=d["id"], question=d["question"], answers=tuple(d["answers"]), meta=dict(d.get("meta", {})))
