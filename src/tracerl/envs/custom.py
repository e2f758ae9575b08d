"""The user's own reward functions and tools, named by reference in the config (docs/custom_tasks.md).

`env.reward=path/to/reward.py:compute_score` (or `my_pkg.rewards:compute_score`) replaces the outcome reward
of every finished episode. Two signatures are accepted, told apart by their parameter names:

* verl: `compute_score(data_source, solution_str, ground_truth, extra_info=None)` returns a number (or a
  dict with a numeric "score");
* TRL: `reward_func(completions, **kwargs)` returns a list with one number per completion; it is called
  with one completion, `prompts`, and the task's dataset columns as lists of one (`ground_truth`,
  `data_source` and `extra_info` too), so a function that names a column gets it.

`solution_str` / the completion is the episode's text after the prompt: every model turn with the
observations between them. A reward function that raises, or returns anything but a finite number, is a
counted failure of that episode, never a crash: its reward is 0 and `info["reward_error"]` names the reason,
which the step metrics count (`reward_errors`, `reward_errors/<reason>`); the first failure of each
reason is also printed to stderr.

`env.tools=[pkg.tools:Calculator, ...]`: each reference is a class (built with no arguments) or an object;
the environment receives them as `tools={name: tool}` (the tool's `name` attribute, else its reference's).
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

from tracerl.envs.base import Environment, StepResult, Task
from tracerl.errors import OptionError
from tracerl.registry import load_reference

VERL_ARGS = ("data_source", "solution_str", "ground_truth", "extra_info")
TRANSCRIPT = "transcript"  # the state key where the wrapper keeps the episode's text


def _fields(task: dict[str, Any] | Task, env_name: str) -> dict[str, Any]:
    """data_source, ground_truth, extra_info and the dataset columns of a task (a Task or its dict)."""
    t = task if isinstance(task, Task) else Task.from_dict(task)
    meta = t.meta
    gold = meta["ground_truth"] if "ground_truth" in meta else (t.answers[0] if len(t.answers) == 1 else list(t.answers))
    extra = meta["extra_info"] if "extra_info" in meta else {k: v for k, v in meta.items() if k != "columns"}
    columns = meta.get("columns") or {"answers": list(t.answers)}
    return {"data_source": str(meta.get("data_source", env_name)), "ground_truth": gold, "extra_info": extra,
            "columns": columns, "prompt": t.question}


@dataclass(frozen=True)
class RewardFunction:
    """A loaded reward function and its convention ("verl" or "trl")."""

    fn: Callable[..., Any]
    style: str
    ref: str
    names: frozenset[str]  # the parameters it takes by name
    any_keyword: bool  # it takes **kwargs
    required: frozenset[str]  # parameters without a default

    def kwargs(self, fields: dict[str, Any], completion: str) -> dict[str, Any]:
        if self.style == "verl":
            given = {"data_source": fields["data_source"], "solution_str": completion,
                     "ground_truth": fields["ground_truth"], "extra_info": fields["extra_info"]}
        else:
            given = {**{k: [v] for k, v in fields["columns"].items()}, "completions": [completion],
                     "prompts": [fields["prompt"]], "ground_truth": [fields["ground_truth"]],
                     "data_source": [fields["data_source"]], "extra_info": [fields["extra_info"]]}
        return given if self.any_keyword else {k: v for k, v in given.items() if k in self.names}

    def check_columns(self, fields: dict[str, Any]) -> None:
        """One-line OptionError if the function needs a parameter the tasks do not supply."""
        missing = sorted(self.required - set(self.kwargs(fields, "")))
        if missing:
            offered = "data_source, solution_str, ground_truth, extra_info" if self.style == "verl" else \
                ", ".join(["completions", "prompts", "ground_truth", "data_source", "extra_info", *fields["columns"]])
            raise OptionError(f"config key 'env.reward': {self.ref} needs {', '.join(missing)}, which the tasks do not "
                              f"supply (its {self.style} call passes {offered})")

    def score(self, fields: dict[str, Any], completion: str) -> tuple[float, str | None]:
        """(reward, None), or (0.0, reason) when the function raised or returned no finite number."""
        try:
            out = self.fn(**self.kwargs(fields, completion))
        except Exception as e:
            return 0.0, f"raised_{type(e).__name__}"
        if self.style == "trl":
            if not isinstance(out, (list, tuple)) or len(out) != 1:
                return 0.0, f"returned_{type(out).__name__}" if not isinstance(out, (list, tuple)) else f"returned_{len(out)}_values"
            out = out[0]
        elif isinstance(out, dict):
            if "score" not in out:
                return 0.0, "returned_dict_without_score"
            out = out["score"]
        number = _number(out)
        if number is None:
            return 0.0, f"returned_{type(out).__name__}"
        if not math.isfinite(number):
            return 0.0, "returned_non_finite"
        return number, None


def _number(value: Any) -> float | None:
    """A float for numbers and anything float() takes but text (numpy and one-element torch values); else None."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def load_reward(ref: str) -> RewardFunction:
    """The reward function `ref` names (env.reward), with its convention; a bad reference, a non-function or
    a signature that is neither verl's nor TRL's is one OptionError."""
    fn = load_reference(ref, "env.reward")
    if isinstance(fn, type) or not callable(fn):
        raise OptionError(f"config key 'env.reward': {ref} is not a function "
                          f"(got {'a class' if isinstance(fn, type) else type(fn).__name__})")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        raise OptionError(f"config key 'env.reward': the signature of {ref} cannot be read") from None
    names = frozenset(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    required = frozenset(p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    any_keyword = any(p.kind == p.VAR_KEYWORD for p in params)
    if "solution_str" in names:
        style = "verl"
    elif "completions" in names:
        style = "trl"
    else:
        shown = ", ".join(p.name for p in params) or "none"
        raise OptionError(f"config key 'env.reward': {ref} has neither verl's signature compute_score(data_source, "
                          f"solution_str, ground_truth, extra_info) nor TRL's reward_func(completions, **kwargs); "
                          f"its parameters: {shown}")
    if style == "verl" and not required <= set(VERL_ARGS):
        raise OptionError(f"config key 'env.reward': {ref} takes verl's solution_str but also requires "
                          f"{', '.join(sorted(required - set(VERL_ARGS)))}, which verl's call does not pass")
    return RewardFunction(fn, style, ref, names, any_keyword, required)


def load_tools(refs: list[str]) -> dict[str, Any]:
    """{name: tool} of env.tools: a referenced class is built with no arguments, anything else used as it is."""
    tools: dict[str, Any] = {}
    for ref in refs:
        obj = load_reference(ref, "env.tools")
        if isinstance(obj, type):
            try:
                obj = obj()
            except Exception as e:
                raise OptionError(f"config key 'env.tools': {ref}() raised {type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:160]}") from None
        name = getattr(obj, "name", None)
        name = name if isinstance(name, str) and name else ref.rpartition(":")[2].split(".")[-1]
        if name in tools:
            raise OptionError(f"config key 'env.tools': two tools are named {name!r}")
        tools[name] = obj
    return tools


class RewardEnv:
    """An environment whose finished episodes are scored by the user's reward function (env.reward).

    Everything but `step` is the wrapped environment's; the state gains the episode's text so far
    (`transcript`: turns and observations), which is the `solution_str` the function scores."""

    def __init__(self, env: Environment, reward: RewardFunction, log=None):
        self.env, self.reward = env, reward
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        self._seen: set[str] = set()
        for split in ("train", "validation", "test", "heldout"):  # a function that names a column the tasks lack
            tasks = env.tasks(split)
            if tasks:
                reward.check_columns(_fields(tasks[0], env.name))
                break

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def step(self, state: dict[str, Any], turn_text: str, truncated: bool = False) -> tuple[dict[str, Any], StepResult]:
        """The wrapped environment's step; when the episode ends, its reward comes from env.reward."""
        new, res = self.env.step(state, turn_text, truncated)
        text = state.get(TRANSCRIPT, "") + (turn_text if isinstance(turn_text, str) else "") + (res.observation or "")
        new = {**new, TRANSCRIPT: text}
        if not res.done:
            return new, res
        value, reason = self.reward.score(_fields(new["task"], self.env.name), text)
        if reason is not None and reason not in self._seen:
            self._seen.add(reason)
            self._log(f"warning: env.reward {self.reward.ref} failed ({reason}) on task {new['task'].get('id')}; "
                      "the episode gets reward 0 and the step metrics count it (reward_errors); "
                      "later failures of this kind are counted, not printed")
        return new, StepResult(res.observation, True, value, {**res.info, "reward_error": reason})
