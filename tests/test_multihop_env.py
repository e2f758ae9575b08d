import copy
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracerl.envs import Environment, make_env
from tracerl.envs.base import StepResult, Task
from tracerl.envs.multihop import FORMAT_MESSAGES, MultiHopEnv, parse_turn

OPTS = dict(n_entities=120, train_size=200, validation_size=40, test_size=40, heldout_size=40)


@pytest.fixture(scope="module")
def env():
    return MultiHopEnv(seed=0, **OPTS)


@pytest.fixture(scope="module")
def task(env):
    return next(t for t in env.tasks("train") if t.meta["hops"] == 2)


def _play(env, task, turns, truncated=()):
    state, results = env.initial_state(task), []
    for i, turn in enumerate(turns):
        state, result = env.step(state, turn, truncated=i in truncated)
        results.append(result)
    return state, results


def test_satisfies_protocol(env):
    assert isinstance(env, Environment)
    assert env.name == "multihop" and env.stop_strings == ("</search>", "</answer>")
    assert env.system_prompt() is None


def test_prompt_is_short_and_contains_question(env, task):
    prompt = env.user_prompt(task)
    assert task.question in prompt and "<search>" in prompt and "<answer>" in prompt
    assert len(prompt) < 400


def test_search_returns_information(env, task):
    name = task.meta["chain"][0]
    state, result = env.step(env.initial_state(task), f"<think>Look up.</think>\n<search>{name}</search>")
    assert not result.done and result.reward == 0.0
    assert result.observation.startswith("\n<information>Doc 1 (") and result.observation.endswith("</information>\n")
    assert f"Doc 1 ({name}):" in result.observation
    assert result.info == {"format_error": None, "tool_call": True, "em": 0.0, "f1": 0.0,
                           "action": "search", "truncated": False}
    assert state["turn"] == 1 and state["history"] == [{"action": "search", "query": name}]


def test_search_without_hits(env, task):
    _, result = env.step(env.initial_state(task), "<search>the of and</search>")
    assert result.observation == "\n<information>No results.</information>\n"


def test_correct_answer_and_alias(env):
    task = next(t for t in env.tasks("train") if t.meta["answer_type"] == "person")
    _, [r] = _play(env, task, [f"<think>ok</think><answer>{task.answers[0]}</answer>"])
    assert r.done and r.reward == 1.0 and r.info["em"] == 1.0 and r.info["f1"] == 1.0
    assert r.observation is None and r.info["action"] == "answer"
    surname = task.answers[1]  # alias: surname only
    _, [r] = _play(env, task, [f"<answer>  {surname.upper()}. </answer>"])
    assert r.reward == 1.0


def test_wrong_answer(env, task):
    _, [r] = _play(env, task, ["<think>guess</think><answer>Nobody Atall</answer>"])
    assert r.done and r.reward == 0.0 and r.info["em"] == 0.0 and r.info["truncated"] is False


def test_missing_think_is_tolerated(env, task):
    _, [r] = _play(env, task, [f"<search>{task.meta['chain'][0]}</search>"])
    assert r.info["format_error"] is None and r.info["tool_call"]


def test_tags_inside_think_are_not_actions(env, task):
    assert parse_turn("<think>maybe <answer>x</answer>?</think><search>Kesh</search>") == ("search", "Kesh")


@pytest.mark.parametrize(
    "text, kind",
    [
        ("<think>hmm</think> I am not sure.", "no_action"),
        ("", "no_action"),
        ("</search>", "no_action"),
        ("<think>x</think><search>Velora", "unclosed_tag"),
        ("<answer>Velora", "unclosed_tag"),
        ("<search>   </search>", "empty_query"),
        ("<search>Velora</search><answer>Kesh</answer>", "both_tags"),
        ("<answer>Kesh <search>Velora</search>", "both_tags"),
    ],
)
def test_malformed_turns_cost_a_turn(env, task, text, kind):
    state, result = env.step(env.initial_state(task), text)
    assert result.info["format_error"] == kind and result.info["action"] == "invalid"
    assert not result.done and result.reward == 0.0 and not result.info["tool_call"]
    assert result.observation == f"\n<information>{FORMAT_MESSAGES[kind]}</information>\n"
    assert state["turn"] == 1


def test_over_long_turns(env, task):
    _, result = env.step(env.initial_state(task), "<search>Velora</search>", truncated=True)
    assert result.info["format_error"] == "too_long" and not result.done
    short = MultiHopEnv(seed=0, max_turn_chars=30, **OPTS)
    _, result = short.step(short.initial_state(task), "<think>" + "x" * 40 + "</think><answer>a</answer>")
    assert result.info["format_error"] == "too_long" and not result.done


def test_turn_budget_exhaustion_by_search(env, task):
    state, results = _play(env, task, ["<search>Velora</search>"] * env.max_turns)
    assert [r.done for r in results] == [False] * (env.max_turns - 1) + [True]
    last = results[-1]
    assert last.observation is None and last.reward == 0.0 and last.info["truncated"] is True
    assert last.info["tool_call"] is False and state["done"] and state["turn"] == env.max_turns


def test_turn_budget_exhaustion_by_format_errors(env, task):
    _, results = _play(env, task, ["nonsense"] * env.max_turns)
    assert results[-1].done and results[-1].info["truncated"] and results[-1].info["format_error"] == "no_action"
    assert results[-1].observation is None


def test_answer_on_last_turn_counts(env, task):
    turns = ["<search>Velora</search>"] * (env.max_turns - 1) + [f"<answer>{task.answers[0]}</answer>"]
    _, results = _play(env, task, turns)
    assert results[-1].reward == 1.0 and results[-1].info["truncated"] is False


def test_step_after_done_never_raises(env, task):
    state, _ = _play(env, task, ["<answer>x</answer>"])
    state2, result = env.step(state, "<search>Velora</search>")
    assert result.done and result.reward == 0.0 and result.info["format_error"] == "episode_over"
    assert state2["turn"] == state["turn"] + 1


def test_step_does_not_mutate_its_input(env, task):
    state = env.initial_state(task)
    for turn in ["<search>Velora</search>", "junk", "<answer>x</answer>"]:
        before = copy.deepcopy(state)
        new, _ = env.step(state, turn)
        assert state == before
        state = new


def _as_tuple(result: StepResult):
    return result.observation, result.done, result.reward, result.info


def test_resume_from_saved_state_is_exact(env):
    rng = random.Random(1)
    for task in env.tasks("validation")[:10]:
        turns = env.oracle_turns(task, rng, {"useless_search": 0.5, "wrong_answer": 0.5})
        turns = ["<think>oops</think>"] + turns  # include a format error in the history
        full_state, full = _play(env, task, turns[: env.max_turns])
        for cut in range(len(full)):
            state, _ = _play(env, task, turns[:cut])
            state = json.loads(json.dumps(state))  # as if saved to disk and loaded back
            for i, turn in enumerate(turns[cut : len(full)], cut):
                state, result = env.step(state, turn)
                assert _as_tuple(result) == _as_tuple(full[i])
            assert state == full_state


def test_oracle_demos_fit_and_noise(env):
    rng = random.Random(0)
    tight = MultiHopEnv(seed=0, max_turns=3, hop_mix={1: 0.5, 2: 0.5}, **OPTS)
    for task in tight.tasks("train")[:40]:
        turns = tight.oracle_turns(task, rng, {"useless_search": 1.0})
        assert len(turns) <= tight.max_turns
    wrong = useless = 0
    for task in env.tasks("train")[:100]:
        turns = env.oracle_turns(task, rng, {"useless_search": 0.3, "wrong_answer": 0.15})
        assert len(turns) <= env.max_turns
        _, results = _play(env, task, turns)
        assert results[-1].done and all(r.info["format_error"] is None for r in results)
        wrong += results[-1].reward == 0.0
        useless += len(turns) > task.meta["hops"] + 1
    assert 3 <= wrong <= 35 and 10 <= useless <= 50


def test_oracle_is_deterministic_and_informative(env, task):
    a = env.oracle_turns(task, random.Random(5), {"useless_search": 0.3, "wrong_answer": 0.15})
    b = env.oracle_turns(task, random.Random(5), {"useless_search": 0.3, "wrong_answer": 0.15})
    assert a == b
    clean = env.oracle_turns(task, random.Random(5), {})
    assert clean[0].startswith("<think>I need ") and task.meta["chain"][0] in clean[0]
    assert [t.split("<search>")[1].removesuffix("</search>") for t in clean[:-1]] == task.meta["chain"]
    assert clean[1].startswith(f"<think>{task.meta['chain'][0]}") and task.meta["chain"][1] in clean[1]
    assert clean[-1].endswith(f"<answer>{task.answers[0]}</answer>")


def test_construction_errors():
    with pytest.raises(ValueError, match="max_turns >= 5"):
        MultiHopEnv(hop_mix={4: 1.0})
    with pytest.raises(ValueError, match="'colour'"):
        MultiHopEnv(colour="red")
    with pytest.raises(ValueError, match="unknown split"):
        MultiHopEnv(**OPTS).tasks("dev")


def test_make_env(env):
    made = make_env("multihop", seed=0, **OPTS)
    assert made.tasks("test") == env.tasks("test")
    with pytest.raises(ValueError, match="unknown option 'n_entitys'"):
        make_env("multihop", n_entitys=5)


TAGS = ["<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>", "<information>",
        "Velora", " ", "\n", "x", "", "<", ">", "/", "\x00", "é", "🙂"]
turn_text = st.one_of(st.text(max_size=200), st.lists(st.sampled_from(TAGS) | st.text(max_size=5), max_size=30).map("".join))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(st.tuples(turn_text, st.booleans()), min_size=1, max_size=6))
def test_fuzz_step_never_raises(env, task, turns):
    state = env.initial_state(task)
    for text, truncated in turns:
        new, result = env.step(state, text, truncated=truncated)
        assert isinstance(result, StepResult) and isinstance(result.done, bool)
        assert result.reward in (0.0, 1.0)
        assert result.info["action"] in ("search", "answer", "invalid")
        assert set(result.info) >= {"format_error", "tool_call", "em", "f1", "action", "truncated"}
        assert (result.observation is None) == result.done
        assert new["turn"] == state["turn"] + 1
        json.dumps(new)
        state = new
        if result.done:
            break


def test_tasks_round_trip(env):
    for t in env.tasks("heldout")[:5]:
        assert Task.from_dict(json.loads(json.dumps(t.to_dict()))) == t
