"""The environment protocol every task family implements.

An environment is a pure function of a JSON-serialisable state: `step(state, turn_text)` returns a
new state and never mutates the old one. Because the state after any turn is plain data, a rollout
can be resumed from any saved prefix (tree rollouts branch from intermediate turns), written to
JSONL, or shipped to another process.

Text only crosses this boundary: environments never see token ids. The rollout engine is the one
place where text becomes tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol, runtime_checkable

from pydantic import AfterValidator, BaseModel, ConfigDict

from tracerl.task import Task  # defined at the bottom layer (trees use it too); still importable from here


@dataclass
class StepResult:
    """What the environment answers to one model turn."""

    observation: str | None  # text appended after the turn (never trained on); None when done
    done: bool
    reward: float = 0.0  # outcome reward, meaningful when done (binary for the built-in envs)
    info: dict[str, Any] = field(default_factory=dict)
    # info keys used by the trainer: "format_error" (str | None), "tool_call" (bool),
    # "em" (float), "f1" (float), "action" ("search" | "answer" | "invalid"), "truncated" (bool)


def _non_empty_train(v: int) -> int:
    if v < 1:
        raise ValueError(f"must be >= 1 (the train split cannot be empty), got {v!r}")
    return v


TrainSize = Annotated[int, AfterValidator(_non_empty_train)]  # RL and the SFT demos draw from the train split


class EnvOptions(BaseModel):
    """Typed `env.options` of one environment, registered with it (`ENVIRONMENTS.register(name,
    options=...)`) and checked when the config is validated, before anything is built or written.

    Strict: values keep the types YAML gives them (no "3" for 3), unknown keys are errors. Every
    field carries a one-line `description`; its default is the constructor's."""

    model_config = ConfigDict(extra="forbid", strict=True)

    def check(self, max_turns: int) -> None:
        """Rules between the options and the shared key env.max_turns; a ValueError names the keys."""


@runtime_checkable
class Environment(Protocol):
    """A multi-turn (or single-turn) verifiable environment."""

    name: str
    max_turns: int
    stop_strings: tuple[str, ...]  # the generation of one turn stops after any of these

    def tasks(self, split: str) -> list[Task]:
        """All tasks of a split ("train", "validation", "test", "heldout")."""

    def system_prompt(self) -> str | None:
        """Instruction placed in the system message (None: put everything in the user message)."""

    def user_prompt(self, task: Task) -> str:
        """The user message for a task (instruction + question when there is no system prompt)."""

    def initial_state(self, task: Task) -> dict[str, Any]:
        """JSON-serialisable state before the first turn."""

    def step(
        self, state: dict[str, Any], turn_text: str, truncated: bool = False
    ) -> tuple[dict[str, Any], StepResult]:
        """Apply one model turn; return the new state and the result. Never raises on model text.

        `truncated` is True when generation hit the per-turn token cap before a stop string
        (an over-long turn: a format error that costs the turn)."""

    def oracle_turns(self, task: Task, rng: "random.Random", noise: dict[str, float]) -> list[str]:
        """Model-turn texts of a (possibly noisy) demonstration that solves `task`, for SFT warm starts."""

    def reference_solution(self, task: Task) -> str | None:
        """How to solve `task`, one sentence for a privileged teacher's note (None: the answer alone)."""
