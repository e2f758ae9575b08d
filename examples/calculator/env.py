"""The example's environment: arithmetic questions answered with the help of a calculator tool.

Each model turn is `<calc>expression</calc>`, answered with `<result>value</result>` by the calculator
tracerl passes in (`env.tools`), or `<answer>number</answer>`, which ends the episode with reward 1 when
the number equals the dataset's answer (`env.reward` may score it instead). Anything else is a format
error that costs the turn. The questions come from the dataset of the config's `data` section
(`tasks`), with the expression to compute kept as an extra field (`extra_info["expression"]`) for the
demonstrations of the SFT warm start (`oracle_turns`).

It implements tracerl's environment protocol (tracerl.envs.base.Environment): the state is plain JSON,
`step` never raises on model text.
"""

from __future__ import annotations

import random
import re
from typing import Any

from tracerl.envs.base import StepResult, Task

INSTRUCTION = ("Compute the answer. Use the calculator with <calc>expression</calc>; the result comes back in "
               "<result></result>. Then give the number in <answer></answer>.")
_TAG = re.compile(r"<(calc|answer)>(.*?)</\1>", re.DOTALL)
SPLITS = ("train", "validation", "test", "heldout")


def as_number(text: str) -> float | None:
    try:
        return float(text.strip().replace(",", ""))
    except ValueError:
        return None


class CalculatorEnv:
    name = "calculator"
    stop_strings = ("</calc>", "</answer>")
    needs_tasks = True  # tracerl: data.train_files must be set

    def __init__(self, tasks: dict[str, list[Task]], tools: dict[str, Any], seed: int = 0, max_turns: int = 3,
                 show_expression: bool = False):
        if "calculator" not in tools:
            raise ValueError(f"CalculatorEnv needs the calculator tool in env.tools (got {sorted(tools)})")
        self.calculator = tools["calculator"]
        self.splits = {s: list(tasks.get(s, [])) for s in SPLITS}
        self.seed, self.max_turns, self.show_expression = seed, max_turns, show_expression

    def tasks(self, split: str) -> list[Task]:
        return list(self.splits[split])

    def system_prompt(self) -> str | None:
        return None

    def user_prompt(self, task: Task) -> str:
        return f"{INSTRUCTION}\nQuestion: {task.question}"

    def initial_state(self, task: Task) -> dict[str, Any]:
        return {"task": task.to_dict(), "turn": 0, "history": [], "done": False}

    def step(self, state: dict[str, Any], turn_text: str, truncated: bool = False) -> tuple[dict[str, Any], StepResult]:
        turn = state["turn"] + 1
        m = _TAG.search(turn_text or "")
        info = {"format_error": None, "tool_call": False, "action": "invalid", "truncated": False, "em": 0.0}
        new = {**state, "turn": turn, "history": list(state["history"])}
        if m is None or truncated:
            info["format_error"] = "too_long" if truncated else "no_action"
            new["history"].append({"action": "invalid", "format_error": info["format_error"]})
            observation = "\n<result>error: write <calc>expression</calc> or <answer>number</answer></result>\n"
        elif m.group(1) == "answer":
            value, gold = as_number(m.group(2)), as_number(state["task"]["answers"][0])
            info.update(action="answer", em=float(value is not None and gold is not None and abs(value - gold) < 1e-6))
            new["history"].append({"action": "answer", "answer": m.group(2).strip()})
            new["done"] = True
            return new, StepResult(None, True, info["em"], info)
        else:
            info.update(action="calc", tool_call=True)
            new["history"].append({"action": "calc", "expression": m.group(2)})
            observation = f"\n<result>{self.calculator(m.group(2))}</result>\n"
        if turn >= self.max_turns:  # out of turns: reward 0
            new["done"], info["truncated"] = True, True
            return new, StepResult(None, True, 0.0, info)
        return new, StepResult(observation, False, 0.0, info)

    def reference_solution(self, task: Task) -> str | None:
        return f"Compute {task.meta['extra_info']['expression']}."

    def oracle_turns(self, task: Task, rng: random.Random, noise: dict[str, float] | None = None) -> list[str]:
        """The calculator on the question's expression, then its value; noise["wrong_answer"] answers off by one."""
        noise = noise or {}
        expression = task.meta["extra_info"]["expression"]
        answer = self.calculator(expression)
        if rng.random() < noise.get("wrong_answer", 0.0):
            answer = str(int(float(answer)) + rng.choice([-1, 1]))
        return [f"<calc>{expression}</calc>", f"<answer>{answer}</answer>"]
