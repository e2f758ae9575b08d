import copy
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracerl.envs import Environment, make_env
from tracerl.envs.arith import SPLITS, ArithmeticEnv, parse_number
from tracerl.envs.base import StepResult


@pytest.fixture(scope="module")
def env():
    return ArithmeticEnv(seed=0)


def _answer(env, task, text, truncated=False):
    return env.step(env.initial_state(task), text, truncated=truncated)


def test_satisfies_protocol(env):
    assert isinstance(env, Environment)
    assert env.name == "arith" and env.max_turns == 1 and env.stop_strings == ("</answer>",)
    task = env.tasks("train")[0]
    assert task.question in env.user_prompt(task)


def test_determinism_and_seed_dependence():
    a, b, c = ArithmeticEnv(seed=1), ArithmeticEnv(seed=1), ArithmeticEnv(seed=2)
    assert a.tasks("train") == b.tasks("train")
    assert [t.question for t in a.tasks("train")] != [t.question for t in c.tasks("train")]


def test_split_sizes_disjoint_and_heldout_unseen(env):
    assert {s: len(env.tasks(s)) for s in SPLITS} == {"train": 2000, "validation": 200, "test": 200, "heldout": 200}
    texts = [t.question for s in SPLITS for t in env.tasks(s)]
    assert len(set(texts)) == len(texts)
    seen = {t.meta["template"] for s in ("train", "validation", "test") for t in env.tasks(s)}
    held = {t.meta["template"] for t in env.tasks("heldout")}
    assert held and not held & seen
    assert {t.meta["ops"] for t in env.tasks("train")} == {1, 2, 3}
    assert all(0 <= int(t.answers[0]) < 1000 for s in SPLITS for t in env.tasks(s))


def test_accepts_shared_config_keys():
    env = make_env("arith", seed=0, max_turns=1, train_size=3, validation_size=0, test_size=0, heldout_size=0)
    assert env.max_turns == 1
    with pytest.raises(ValueError, match="single-turn: set env.max_turns=1"):
        make_env("arith", max_turns=4)
    with pytest.raises(ValueError, match="unknown option 'top_k'"):
        make_env("arith", top_k=3)


def test_configurable_sizes():
    small = make_env("arith", seed=0, train_size=10, validation_size=5, test_size=0, heldout_size=3)
    assert [len(small.tasks(s)) for s in SPLITS] == [10, 5, 0, 3]


@pytest.mark.parametrize("split", SPLITS)
def test_noiseless_oracle_is_always_right(env, split):
    rng = random.Random(0)
    for task in env.tasks(split):
        [turn] = env.oracle_turns(task, rng, {})
        _, result = _answer(env, task, turn)
        assert result.reward == 1.0 and result.info["format_error"] is None


def test_oracle_wrong_answer_noise(env):
    rng = random.Random(0)
    rewards = []
    for task in env.tasks("train")[:200]:
        [turn] = env.oracle_turns(task, rng, {"wrong_answer": 0.15})
        rewards.append(_answer(env, task, turn)[1].reward)
    assert 10 <= rewards.count(0.0) <= 55


@pytest.mark.parametrize("fmt", ["{}", "{}.0", " {} apples", "<think>x</think>{}", "It is {}."])
def test_numeric_answers_are_tolerated(env, fmt):
    task = env.tasks("test")[0]
    text = fmt.format(task.answers[0])
    if "<think>" in text:
        text = text.replace("</think>", "</think><answer>") + "</answer>"
    else:
        text = f"<think>done</think><answer>{text}</answer>"
    state, result = _answer(env, task, text)
    assert result.done and result.reward == 1.0 and result.info["em"] == 1.0
    assert state["turn"] == 1 and result.observation is None


@pytest.mark.parametrize(
    "text, truncated, kind",
    [
        ("no tags here", False, "no_action"),
        ("<answer>12", False, "unclosed_tag"),
        ("<answer>twelve</answer>", False, "no_number"),
        ("<answer>12</answer>", True, "too_long"),
    ],
)
def test_malformed_turns_end_with_zero(env, text, truncated, kind):
    _, result = _answer(env, env.tasks("test")[0], text, truncated)
    assert result.done and result.reward == 0.0 and result.info["format_error"] == kind


def test_wrong_number(env):
    task = env.tasks("test")[0]
    _, result = _answer(env, task, f"<answer>{int(task.answers[0]) + 1}</answer>")
    assert result.reward == 0.0 and result.info["format_error"] is None


def test_max_turn_chars():
    env = ArithmeticEnv(seed=0, train_size=5, validation_size=0, test_size=0, heldout_size=0, max_turn_chars=10)
    _, result = _answer(env, env.tasks("train")[0], "<think>long thoughts</think><answer>1</answer>")
    assert result.info["format_error"] == "too_long"


def test_parse_number():
    assert parse_number("7") == 7 and parse_number("7.0") == 7 and parse_number(" 7 apples") == 7
    assert parse_number("-3 then 4") == -3 and parse_number("1,200") == 1200
    assert parse_number("none") is None


def test_step_does_not_mutate_and_round_trips(env):
    state = env.initial_state(env.tasks("train")[0])
    before = copy.deepcopy(state)
    new, result = env.step(json.loads(json.dumps(state)), "<answer>3</answer>")
    assert state == before and json.loads(json.dumps(new)) == new


_FUZZ_ENV = ArithmeticEnv(seed=0, train_size=5, validation_size=0, test_size=0, heldout_size=0)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=100) | st.lists(st.sampled_from(["<answer>", "</answer>", "7", "-", ".", "x", "<think>"]), max_size=12).map("".join), truncated=st.booleans())
def test_fuzz_step_never_raises(text, truncated):
    env = _FUZZ_ENV
    state = env.initial_state(env.tasks("train")[0])
    new, result = env.step(state, text, truncated=truncated)
    assert isinstance(result, StepResult) and result.done and result.reward in (0.0, 1.0)
    assert new["turn"] == 1
