"""`qa`: single-turn question answering over the user's own dataset (config section `data`).

The model sees an instruction and the dataset's prompt and answers `<think>...</think><answer>text</answer>`
in one turn; the reward is the exact match of the answer with the gold answers (`eval.em`), or whatever
`env.reward` computes (`tracerl.envs.custom`: verl's `compute_score` or a TRL reward function). The tasks
come from `data.*_files` (`tracerl.envs.dataset`); with an empty `instruction` the prompt is shown as it is
(datasets whose prompts already say how to answer).
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field

from tracerl.envs.answers import exact_match, f1_score
from tracerl.envs.base import EnvOptions, StepResult, Task
from tracerl.envs.tags import strip_think, tag_body
from tracerl.errors import OptionError
from tracerl.task import SPLITS

INSTRUCTION = "Answer the question. Think inside <think></think>, then give the final answer in <answer></answer>."


class QAOptions(EnvOptions):
    """env.options of `qa`: the instruction and the turn length (the tasks come from data.*)."""

    instruction: str = Field(INSTRUCTION, description="Shown before each prompt (\"\": the prompt alone).")
    max_turn_chars: int | None = Field(None, ge=1, description="Longest answer turn in characters; longer turns are format errors (None: no cap).")

    def check(self, max_turns: int) -> None:
        if max_turns != 1:
            raise ValueError(f"environment 'qa' is single-turn: set env.max_turns=1 (got {max_turns})")


class QAEnv:
    """Single-turn QA on dataset tasks, scored by exact match (or env.reward)."""

    name = "qa"
    needs_tasks = True  # a dataset (data.*) is required: tracerl.setup.check_custom_task says so up front
    max_turns = 1
    stop_strings = ("</answer>",)

    def __init__(self, seed: int = 0, max_turns: int = 1, tasks: dict[str, list[Task]] | None = None,
                 instruction: str = INSTRUCTION, max_turn_chars: int | None = None):
        if max_turns != 1:
            raise OptionError(f"environment 'qa' is single-turn: set env.max_turns=1 (got {max_turns})")
        if not tasks or not any(tasks.values()):
            raise OptionError("environment 'qa' reads its tasks from a dataset: set data.train_files "
                              "(and data.validation_files or data.validation_size)")
        self.seed, self.instruction, self.max_turn_chars = seed, instruction, max_turn_chars
        self._splits = {s: list(tasks.get(s, [])) for s in SPLITS}

    def tasks(self, split: str) -> list[Task]:
        """The dataset's tasks of a split (empty when no file was given for it)."""
        if split not in SPLITS:
            raise OptionError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return list(self._splits[split])

    def system_prompt(self) -> str | None:
        """None: the instruction goes in the user message."""
        return None

    def user_prompt(self, task: Task) -> str:
        """The instruction (if any) followed by the dataset's prompt."""
        return f"{self.instruction}\n{task.question}" if self.instruction else task.question

    def initial_state(self, task: Task) -> dict[str, Any]:
        """JSON-serialisable state before the (only) turn."""
        return {"task": task.to_dict(), "turn": 0, "history": [], "done": False}

    def step(self, state: dict[str, Any], turn_text: str, truncated: bool = False) -> tuple[dict[str, Any], StepResult]:
        """Score the answer of the single turn; the episode always ends here."""
        text = turn_text if isinstance(turn_text, str) else ""
        body = strip_think(text)
        answer = tag_body(body, "answer")
        if truncated or (self.max_turn_chars is not None and len(text) > self.max_turn_chars):
            error = "too_long"
        elif state.get("done"):
            error = "episode_over"
        elif answer is None:
            error = "unclosed_tag" if "<answer>" in body else "no_action"
        else:
            error = None
        golds = state["task"]["answers"]
        em = f1 = 0.0
        if error is None:
            em, f1 = exact_match(answer, golds), f1_score(answer, golds)
        entry = {"action": "invalid", "format_error": error} if error else {"action": "answer", "answer": answer.strip()}
        new = {**state, "turn": state.get("turn", 0) + 1, "history": [*state.get("history", []), entry], "done": True}
        info = {"format_error": error, "tool_call": False, "em": em, "f1": f1, "action": entry["action"],
                "truncated": False}
        return new, StepResult(None, True, em, info)

    def reference_solution(self, task: Task) -> str | None:
        """None: the teacher's note holds the gold answer only."""
        return None

    def oracle_turns(self, task: Task, rng: random.Random, noise: dict[str, float] | None = None) -> list[str]:
        """The gold answer in one turn; noise["wrong_answer"] answers with another task's gold answer."""
        noise = noise or {}
        answer = task.answers[0]
        if rng.random() < noise.get("wrong_answer", 0.0):
            others = [t.answers[0] for t in self._splits["train"][:200] if t.answers[0] != answer]
            answer = rng.choice(others) if others else answer
        return [f"<think>The answer is {answer}.</think>\n<answer>{answer}</answer>"]
