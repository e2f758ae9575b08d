"""A single-turn arithmetic word-problem environment, generated deterministically from a seed.

A problem starts with a quantity and applies 1-3 operations (add, subtract, multiply, divide evenly)
described in words; the model answers `<think>...</think><answer>NUMBER</answer>` in one turn. The
"heldout" split uses operation sequences never asked in train/validation/test.
"""

from __future__ import annotations

import random
import re
from typing import Any

from pydantic import Field

from tracerl.envs.base import EnvOptions, StepResult, Task, TrainSize
from tracerl.errors import OptionError
from tracerl.task import SPLITS

INSTRUCTION = "Solve the problem. Think inside <think></think>, then give the number in <answer></answer>."

NAMES = ("Mila", "Tom", "Ada", "Ravi", "Lena", "Omar", "Yuki", "Sara", "Ben", "Nia", "Ivan", "Zoe",
         "Kofi", "Ana", "Leo", "Maya")
ITEMS = ("apples", "marbles", "stamps", "books", "coins", "shells", "pencils", "cards", "eggs",
         "stickers", "beads", "plums")
OPS = ("add", "sub", "mul", "div")
OP_COUNT_MIX = {1: 0.3, 2: 0.4, 3: 0.3}  # share of problems with 1, 2 and 3 operations
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
# Several wordings per operation; {n} is the person, {b} the operand, {i} the items.
PHRASES = {
    "add": ("{n} buys {b} more.", "{n} finds {b} more.", "A friend gives {n} {b} more {i}."),
    "sub": ("{n} gives away {b}.", "{n} loses {b} of them.", "{n} sells {b} {i}."),
    "mul": ("{n} ends up with {b} times as many.", "The number of {i} grows {b}-fold."),
    "div": ("{n} splits them into {b} equal groups and keeps one group.",
            "{n} packs them equally into {b} bags and keeps one bag."),
}
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_number(text: str) -> float | None:
    """The first number in `text` ("7", "7.0", " 7 apples", "1,200"), or None."""
    m = _NUMBER.search(re.sub(r"(?<=\d),(?=\d{3}\b)", "", text))
    return float(m.group()) if m else None


def _apply(op: str, a: int, b: int) -> int:
    return {"add": a + b, "sub": a - b, "mul": a * b, "div": a // b}[op]


def _operand(rng: random.Random, op: str, value: int) -> int | None:
    """A small operand that keeps the running value a non-negative integer below 1000."""
    if op == "add":
        return rng.randint(1, 20)
    if op == "sub":
        return rng.randint(1, value) if value >= 1 else None
    if op == "mul":
        b = rng.randint(2, 4)
        return b if value * b < 1000 else None
    divisors = [d for d in range(2, 6) if value % d == 0 and value > 0]
    return rng.choice(divisors) if divisors else None


def _problem(rng: random.Random, ops: tuple[str, ...]) -> tuple[str, list[list[Any]]] | None:
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, 30)
    sentences, steps = [f"{name} has {value} {items}."], []
    for op in ops:
        b = _operand(rng, op, value)
        if b is None:
            return None
        sentences.append(rng.choice(PHRASES[op]).format(n=name, b=b, i=items))
        steps.append([value, op, b, _apply(op, value, b)])
        value = steps[-1][-1]
    sentences.append(f"How many {items} does {name} have now?")
    return " ".join(sentences), steps


class ArithOptions(EnvOptions):
    """env.options of `arith`: split sizes and the turn length."""

    train_size: TrainSize = Field(2000, description="Problems in the train split (>= 1).")
    validation_size: int = Field(200, ge=0, description="Problems in the validation split.")
    test_size: int = Field(200, ge=0, description="Problems in the test split.")
    heldout_size: int = Field(200, ge=0, description="Problems in the heldout split (operation sequences never trained on).")
    max_turn_chars: int | None = Field(None, ge=1, description="Longest answer turn in characters; longer turns are format errors (None: no cap).")

    def check(self, max_turns: int) -> None:
        if max_turns != 1:
            raise ValueError(f"environment 'arith' is single-turn: set env.max_turns=1 (got {max_turns})")


class ArithmeticEnv:
    """Single-turn arithmetic word problems with a numeric checker."""

    name = "arith"
    max_turns = 1
    stop_strings = ("</answer>",)

    def __init__(self, seed: int = 0, train_size: int = 2000, validation_size: int = 200, test_size: int = 200,
                 heldout_size: int = 200, max_turn_chars: int | None = None, max_turns: int = 1):
        # max_turns is accepted so that every environment takes the shared config keys; an arithmetic
        # episode is a single turn, so any other value is a configuration mistake worth naming.
        if max_turns != 1:
            raise OptionError(f"environment 'arith' is single-turn: set env.max_turns=1 (got {max_turns})")
        if min(train_size, validation_size, test_size, heldout_size) < 0:
            raise OptionError("split sizes must be >= 0")
        self.seed, self.max_turn_chars = seed, max_turn_chars
        sizes = {"validation": validation_size, "test": test_size, "train": train_size, "heldout": heldout_size}
        self._splits = self._make_splits(sizes)

    def _make_splits(self, sizes: dict[str, int]) -> dict[str, list[Task]]:
        rng = random.Random(f"tracerl-arith-{self.seed}")
        by_length = {1: [(a,) for a in OPS], 2: [(a, b) for a in OPS for b in OPS],
                     3: [(a, b, c) for a in OPS for b in OPS for c in OPS]}
        # A fifth of the 2- and 3-operation sequences is reserved for "heldout"; single operations
        # always stay in training so that every operation is seen there.
        heldout: set[tuple[str, ...]] = set()
        for k in (2, 3):
            seqs = list(by_length[k])
            rng.shuffle(seqs)
            heldout.update(seqs[: len(seqs) // 5])
        seen: set[str] = set()
        splits: dict[str, list[Task]] = {}
        for split, size in sizes.items():
            pools = {k: sorted(s for s in seqs if (s in heldout) == (split == "heldout")) for k, seqs in by_length.items()}
            lengths = [k for k in OP_COUNT_MIX if pools[k]]
            weights = [OP_COUNT_MIX[k] for k in lengths]
            tasks, attempts = [], 0
            while len(tasks) < size and attempts < 50 * size + 100:
                attempts += 1
                made = _problem(rng, rng.choice(pools[rng.choices(lengths, weights)[0]]))
                if made is None or made[0] in seen:
                    continue
                question, steps = made
                seen.add(question)
                ops = [s[1] for s in steps]
                meta = {"split": split, "ops": len(ops), "template": "-".join(ops), "steps": steps}
                tasks.append(Task(f"arith-s{self.seed}-{split}-{len(tasks)}", question, (str(steps[-1][-1]),), meta))
            splits[split] = tasks
        return splits

    def tasks(self, split: str) -> list[Task]:
        """All tasks of a split ("train", "validation", "test", "heldout")."""
        if split not in self._splits:
            raise OptionError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return list(self._splits[split])

    def system_prompt(self) -> str | None:
        """None: the instruction goes in the user message."""
        return None

    def user_prompt(self, task: Task) -> str:
        """The instruction followed by the problem."""
        return f"{INSTRUCTION}\nProblem: {task.question}"

    def initial_state(self, task: Task) -> dict[str, Any]:
        """JSON-serialisable state before the (only) turn."""
        return {"task": task.to_dict(), "turn": 0, "history": [], "done": False}

    def step(self, state: dict[str, Any], turn_text: str, truncated: bool = False) -> tuple[dict[str, Any], StepResult]:
        """Check the answer of the single turn; the episode always ends here."""
        text = turn_text if isinstance(turn_text, str) else ""
        error, value = None, None
        m = _ANSWER.search(text)
        if truncated or (self.max_turn_chars is not None and len(text) > self.max_turn_chars):
            error = "too_long"
        elif state.get("done"):
            error = "episode_over"
        elif m is None:
            error = "unclosed_tag" if "<answer>" in text else "no_action"
        else:
            value = parse_number(m.group(1))
            error = "no_number" if value is None else None
        gold = float(state["task"]["answers"][0])
        reward = float(value is not None and abs(value - gold) < 1e-9)
        entry = {"action": "invalid", "format_error": error} if error else {"action": "answer", "answer": m.group(1).strip()}
        new = {**state, "turn": state.get("turn", 0) + 1, "history": [*state.get("history", []), entry], "done": True}
        info = {"format_error": error, "tool_call": False, "em": reward, "f1": reward,
                "action": entry["action"], "truncated": False}
        return new, StepResult(None, True, reward, info)

    def reference_solution(self, task: Task) -> str | None:
        """The worked steps."""
        steps = task.meta.get("steps", [])
        if not steps:
            return None
        return "Solution: " + " ".join(f"{a} {SYMBOL.get(op, op)} {b} = {r}." for a, op, b, r in steps)

    def oracle_turns(self, task: Task, rng: random.Random, noise: dict[str, float] | None = None) -> list[str]:
        """One turn that works through the steps; noise["wrong_answer"] makes the last step wrong."""
        noise = noise or {}
        wrong = rng.random() < noise.get("wrong_answer", 0.0)
        steps = [list(s) for s in task.meta["steps"]]
        if wrong:
            # An arithmetic slip in the last step, carried into the answer.
            steps[-1][3] += rng.choice([-3, -2, -1, 1, 2, 3])
        thought = " ".join(f"{a} {SYMBOL[op]} {b} = {r}." for a, op, b, r in steps)
        return [f"<think>{thought}</think>\n<answer>{steps[-1][3]}</answer>"]
