"""Bring your own task (issue 20 item 1): rewards, environments and tools by reference, datasets through
Hugging Face `datasets`, and a reward function that fails without stopping the run."""

from __future__ import annotations

import json
import random
import sys
import textwrap
from pathlib import Path

import pytest

from tracerl.config import load_config
from tracerl.errors import TracerlError
from tracerl.runlog import read_jsonl
from tracerl.setup import build_env, check_custom_task, preflight

REPO = Path(__file__).resolve().parents[1]
ARITH = ["env.name=arith", "env.max_turns=1", "env.options={train_size: 20, validation_size: 4, test_size: 4, heldout_size: 4}"]

REWARDS = '''
def verl_score(data_source, solution_str, ground_truth, extra_info=None):
    # every argument shows in the value: the gold answer in the text, the source, the extra fields
    return 0.5 * (str(ground_truth) in solution_str) + 0.25 * (data_source == "arith") + 0.125 * ("ops" in extra_info)

def trl_reward(completions, ground_truth, **kwargs):
    return [1.0 + (str(ground_truth[0]) in completions[0]) + 0.5 * ("prompts" in kwargs)]
'''


def _scored(env, turn: str):
    task = env.tasks("train")[0]
    _, res = env.step(env.initial_state(task), turn.format(gold=task.answers[0]))
    return res


@pytest.mark.parametrize("style", ["verl", "trl"])
@pytest.mark.parametrize("by", ["file path", "import path"])
def test_a_reward_by_file_path_or_import_path_in_either_signature(tmp_path, monkeypatch, style, by):
    (tmp_path / "user_rewards.py").write_text(REWARDS)
    fn = "verl_score" if style == "verl" else "trl_reward"
    if by == "file path":
        ref = f"{tmp_path}/user_rewards.py:{fn}"
    else:
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "user_rewards", raising=False)
        ref = f"user_rewards:{fn}"
    cfg = load_config(None, [*ARITH, f"env.reward={ref}"])
    check_custom_task(cfg)  # what preflight checks of the user's code
    env = build_env(cfg)
    right, wrong = _scored(env, "<answer>{gold}</answer>"), _scored(env, "<answer>-1</answer>")
    if style == "verl":
        assert (right.reward, wrong.reward) == (0.875, 0.375)
    else:
        assert (right.reward, wrong.reward) == (2.5, 1.5)
    assert right.info["reward_error"] is None and right.info["em"] == 1.0  # the environment's own EM is kept


FAILING = '''
calls = []

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    calls.append(1)
    kind = len(calls) % 3
    if kind == 1:
        return 1 / 0
    if kind == 2:
        return "high"
    return float("nan") if len(calls) % 2 else 1.0
'''


def test_a_failing_reward_is_a_counted_failure_not_a_crash(tmp_path, capsys):
    (tmp_path / "bad_reward.py").write_text(FAILING)
    cfg = load_config(None, [*ARITH, f"env.reward={tmp_path}/bad_reward.py:compute_score"])
    env = build_env(cfg)
    results = [_scored(env, "<answer>{gold}</answer>") for _ in range(6)]
    assert [r.reward for r in results] == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert [r.info["reward_error"] for r in results] == ["raised_ZeroDivisionError", "returned_str", "returned_non_finite",
                                                         "raised_ZeroDivisionError", "returned_str", None]
    warned = capsys.readouterr().err.strip().splitlines()
    assert len(warned) == 3 and all("env.reward" in w and "reward_errors" in w for w in warned)  # once per reason


def _example_overrides(run_dir: Path) -> list[str]:
    """The example's config shrunk to a seconds-long run (a few SFT steps, 2 RL steps)."""
    return ["model.hidden_size=64", "model.num_layers=2", "model.vocab_size=600", "sft.demos=100", "sft.steps=30", "sft.batch_size=8", "rollout.prompts_per_step=2", "rollout.group_size=4",
            "trainer.steps=2", "trainer.eval_every=0", "trainer.eval_size=4", "trainer.eval_at_start=false",
            "trainer.checkpoint_every=0", "trainer.micro_batch_size=8", "trainer.tree_log_every=0",
            "rollout.temperature=1.0", "trainer.progress=false", "run.threads=1", f"run.dir={run_dir}"]


def test_a_crashing_reward_in_training_is_counted_and_the_run_continues(tmp_path, monkeypatch):
    from tracerl.train import train

    (tmp_path / "bad_reward.py").write_text(FAILING)
    monkeypatch.chdir(REPO)  # the example's references are relative to the repository root
    run_dir, result = train("examples/calculator/config.yaml",
                            [*_example_overrides(tmp_path / "run"), f"env.reward={tmp_path}/bad_reward.py:compute_score"],
                            log=lambda *_: None)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        reasons = {k: v for k, v in r.items() if k.startswith("reward_errors/")}
        assert set(reasons) <= {"reward_errors/raised_ZeroDivisionError", "reward_errors/returned_str",
                                "reward_errors/returned_non_finite"}
        assert r["reward_errors"] == sum(reasons.values()) and 0 < r["reward_errors"] <= r["leaves"]
    assert sum(r["reward_errors"] for r in rows) >= 2 * 8 * 2 // 3  # two of every three calls fail
    assert "reward_errors" in result and (run_dir / "report.html").is_file()  # evaluated and finished


def _verl_parquet(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"data_source": "toy", "prompt": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": f"What is {i} plus {i}?"}],
                "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
                "extra_info": {"index": i, "split": "train"}} for i in range(rows)]
    pq.write_table(pa.Table.from_pylist(records), path)


def test_a_dataset_from_parquet_via_datasets_with_a_trl_reward_reading_its_columns(tmp_path, monkeypatch):
    _verl_parquet(tmp_path / "train.parquet", 12)
    (tmp_path / "col_reward.py").write_text(
        "def reward(completions, ability, reward_model, **kwargs):\n"
        "    return [float(reward_model[0]['ground_truth'] in completions[0]) + (ability[0] == 'math')]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, ["env.name=qa", "env.max_turns=1", "env.options={}", f"data.train_files={tmp_path}/train.parquet",
                             "data.answer_key=reward_model.ground_truth", "data.validation_size=2",
                             "env.reward=col_reward:reward"])
    preflight(cfg)
    env = build_env(cfg)
    train, val = env.tasks("train"), env.tasks("validation")
    assert (len(train), len(val)) == (10, 2) and not {t.id for t in train} & {t.id for t in val}
    task = next(t for t in train + val if t.meta["row"] == 3)
    assert task.question == "What is 3 plus 3?" and task.answers == ("6",) and task.id == "train.parquet-3"
    assert task.meta["data_source"] == "toy" and task.meta["ground_truth"] == "6"
    assert task.meta["extra_info"]["extra_info"] == {"index": 3, "split": "train"}  # every other column (extra_keys None)
    assert env.user_prompt(task).endswith("What is 3 plus 3?")
    _, right = env.step(env.initial_state(task), "<think>3+3</think><answer>6</answer>")
    _, wrong = env.step(env.initial_state(task), "<answer>7</answer>")
    assert (right.reward, wrong.reward, right.info["em"], wrong.info["em"]) == (2.0, 1.0, 1.0, 0.0)


def test_a_csv_dataset_with_a_column_mapping(tmp_path):
    (tmp_path / "qa.csv").write_text("q,a,topic,uid\nCapital of France?,Paris,geo,x1\nTwo and two?,4,math,x2\n")
    cfg = load_config(None, ["env.name=qa", "env.max_turns=1", "env.options={instruction: ''}",
                             f"data.train_files={tmp_path}/qa.csv", f"data.validation_files={tmp_path}/qa.csv",
                             "data.prompt_key=q", "data.answer_key=a", "data.extra_keys=[topic]", "data.id_key=uid"])
    env = build_env(cfg)
    tasks = env.tasks("train")
    assert [(t.id, t.question, t.answers, t.meta["extra_info"]) for t in tasks] == [
        ("x1", "Capital of France?", ("Paris",), {"topic": "geo"}), ("x2", "Two and two?", ("4",), {"topic": "math"})]
    assert env.user_prompt(tasks[0]) == "Capital of France?"  # instruction "" shows the prompt alone
    demo = env.oracle_turns(tasks[0], random.Random(0), {})
    assert env.step(env.initial_state(tasks[0]), demo[0])[1].reward == 1.0


BAD = {
    "missing file": (["env.reward={tmp}/nowhere.py:f"], "does not exist"),
    "missing attribute": (["env.reward={tmp}/rewards.py:nope"], "has no attribute 'nope'"),
    "missing module": (["env.reward=no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    "file that raises": (["env.reward={tmp}/broken.py:f"], "raised NameError"),
    "wrong signature": (["env.reward={tmp}/rewards.py:two_args"], "neither verl's signature"),
    "verl plus a required extra": (["env.reward={tmp}/rewards.py:greedy"], "also requires temperature"),
    "not a function": (["env.reward={tmp}/rewards.py:NUMBER"], "is not a function (got int)"),
    "not a reference": (["env.reward=rewards.compute"], "must be a reference"),
    "env not a class": (["env.name={tmp}/rewards.py:two_args", "env.options={}"], "is a function, not an environment class"),
    "env lacks the protocol": (["env.name={tmp}/rewards.py:Half", "env.options={}"], "it has no tasks, initial_state, step"),
    "tools to an env without tools": (["env.tools=[{tmp}/rewards.py:Half]"], "takes no tools argument"),
    "dataset to multihop": (["data.train_files={tmp}/x.jsonl"], "makes its own tasks"),
    "unknown env option": (["env.name={tmp}/rewards.py:Tiny", "env.options={colour: 1}"], "unknown option 'colour'"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_references_are_one_line_errors_before_anything_is_built(tmp_path, case):
    (tmp_path / "rewards.py").write_text(textwrap.dedent('''
        NUMBER = 3
        def two_args(a, b): return 1.0
        def greedy(data_source, solution_str, ground_truth, temperature): return 1.0
        class Half:
            def user_prompt(self, task): return ""
            def system_prompt(self): return None
        class Tiny(Half):
            def __init__(self, seed=0, max_turns=1, size=3): pass
            def tasks(self, split): return []
            def initial_state(self, task): return {}
            def step(self, state, text, truncated=False): return state, None
    '''))
    (tmp_path / "broken.py").write_text("x = undefined_name\n")
    overrides, needle = BAD[case]
    with pytest.raises(TracerlError) as e:
        cfg = load_config(None, [o.replace("{tmp}", str(tmp_path)) for o in overrides])
        preflight(cfg)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg
    assert "config key" in msg, msg
