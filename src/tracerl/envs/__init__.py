"""Environments behind one protocol (see `base.py`), looked up by name in `ENVIRONMENTS`.

Each environment is registered with its typed options (an `EnvOptions` model, the `options` trait):

    ENVIRONMENTS.register("multihop", options=MultiHopOptions)(MultiHopEnv)

`check_options` validates env.name and env.options against it. The config sits below the environments
(it knows none of them), so the commands run it right after loading the config, before anything is
built or written (`tracerl.cli`); `make_env` runs it too.

env.name may also be a reference to the user's own class, `my_pkg.envs:MyEnv` or `path/to/env.py:MyEnv`
(`tracerl.registry.load_reference`; docs/custom_tasks.md): its options are checked against its
`options_model` (an `EnvOptions`) when it has one, else against its constructor's keywords.
"""

from __future__ import annotations

import inspect
from typing import Any

from pydantic import ValidationError

from tracerl.envs.arith import ArithmeticEnv, ArithOptions
from tracerl.envs.base import Environment, EnvOptions, StepResult, Task
from tracerl.envs.multihop import MultiHopEnv, MultiHopOptions
from tracerl.envs.real_qa import RealQAEnv, RealQAOptions
from tracerl.envs.qa import QAEnv, QAOptions
from tracerl.errors import OptionError, validation_key, validation_problem
from tracerl.registry import Registry, is_reference, load_reference

ENVIRONMENTS: Registry = Registry("environment", traits={"options": None})
ENVIRONMENTS.register("multihop", options=MultiHopOptions)(MultiHopEnv)
ENVIRONMENTS.register("arith", options=ArithOptions)(ArithmeticEnv)
ENVIRONMENTS.register("real_qa", options=RealQAOptions)(RealQAEnv)
ENVIRONMENTS.register("qa", options=QAOptions)(QAEnv)

SHARED_KEYS = ("seed", "max_turns")  # env.seed and env.max_turns: every environment takes them
INPUT_KEYS = ("tasks", "tools")  # what setup passes from data.* and env.tools (not env.options)
PROTOCOL = ("tasks", "system_prompt", "user_prompt", "initial_state", "step")  # methods every environment has


def env_class(name: str) -> type:
    """The class of environment `name`: a registered name, or a reference to the user's class
    (one-line OptionError when it cannot be loaded or is not an environment class)."""
    if not is_reference(name):
        if name not in ENVIRONMENTS:
            raise OptionError(f"config key 'env.name': unknown environment {name!r}; valid: "
                              f"{', '.join(ENVIRONMENTS.names())} or a reference module:Class / path/to/file.py:Class")
        return ENVIRONMENTS.get(name)
    cls = load_reference(name, "env.name")
    if not isinstance(cls, type):
        raise OptionError(f"config key 'env.name': {name} is a {type(cls).__name__}, not an environment class")
    missing = [m for m in PROTOCOL if not callable(getattr(cls, m, None))]
    if missing:
        raise OptionError(f"config key 'env.name': {name} is not an environment: it has no {', '.join(missing)} "
                          "(the protocol: tracerl.envs.base.Environment)")
    model = getattr(cls, "options_model", None)
    if model is not None and not (isinstance(model, type) and issubclass(model, EnvOptions)):
        raise OptionError(f"config key 'env.name': {name}.options_model must be a tracerl.envs.EnvOptions subclass")
    return cls


def takes(cls: type, argument: str) -> bool:
    """Whether an environment class's constructor names `argument` (data.* and env.tools reach only
    environments that ask for `tasks` / `tools` by name)."""
    return argument in inspect.signature(cls).parameters


def option_names(cls: type) -> list[str]:
    """Keyword options an environment class accepts (its constructor's, plus `extra_options`)."""
    params = inspect.signature(cls).parameters.values()
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named + [n for n in getattr(cls, "extra_options", ()) if n not in named]


def options_model(name: str) -> type[EnvOptions] | None:
    """The typed options registered with environment `name` (None: an environment registered without); of a
    referenced class, its `options_model` attribute."""
    if is_reference(name):
        return getattr(env_class(name), "options_model", None)
    return ENVIRONMENTS.trait(name, "options")


def check_options(name: str, options: dict[str, Any], max_turns: int) -> dict[str, Any]:
    """`options` (env.options) if environment `name` accepts them with `max_turns`, else a one-line
    OptionError naming the key and the bad value. The options come back as given (only the keys set),
    so a run's config and its SFT cache key do not change."""
    cls = env_class(name)
    model = options_model(name)
    if model is None:
        valid = [n for n in option_names(cls) if n not in SHARED_KEYS + INPUT_KEYS]
        unknown = [k for k in options if k not in valid]
        any_keyword = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(cls).parameters.values())
        if unknown and not any_keyword:
            raise OptionError(f"config key 'env.options': unknown option {unknown[0]!r} for environment {name!r}; "
                              f"allowed: {', '.join(valid) or 'none'}")
        return options
    try:
        typed = model.model_validate(options)
    except ValidationError as e:
        err = e.errors()[0]
        key = validation_key(err["loc"])
        if err["type"] == "extra_forbidden":
            raise OptionError(f"config key 'env.options': unknown option {key.split('.')[0]!r} for environment "
                              f"{name!r}; allowed: {', '.join(model.model_fields)}") from None
        problem = validation_problem(err)
        raise OptionError(problem if not key else f"config key 'env.options.{key}': {problem}") from None
    try:
        typed.check(max_turns)
    except ValueError as e:
        raise OptionError(str(e)) from None
    return options


def make_env(name: str, **kwargs: Any) -> Environment:
    """Build a registered environment; a bad option fails in one line (for typed options: the same
    check as the config's), an unknown one with the list of valid ones."""
    cls = env_class(name)
    for argument in INPUT_KEYS:
        if argument in kwargs and not takes(cls, argument):
            raise OptionError(f"environment {name!r} takes no {argument!r} argument, so "
                              f"{'data.* (a dataset)' if argument == 'tasks' else 'env.tools'} cannot be given to it")
    if options_model(name) is not None:
        options = {k: v for k, v in kwargs.items() if k not in SHARED_KEYS + INPUT_KEYS}
        max_turns = kwargs.get("max_turns", inspect.signature(cls).parameters["max_turns"].default)
        check_options(name, options, max_turns)
        return cls(**kwargs)
    valid = option_names(cls)
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise OptionError(f"unknown option {unknown[0]!r} for environment {name!r}; valid: {', '.join(valid)}")
    return cls(**kwargs)


__all__ = ["ENVIRONMENTS", "Environment", "EnvOptions", "StepResult", "Task", "ArithmeticEnv", "MultiHopEnv",
           "QAEnv", "RealQAEnv", "check_options", "env_class", "make_env", "option_names", "options_model", "takes"]
