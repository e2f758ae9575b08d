"""End-to-end training: the CLI entry point, exact resume, and bad input that must fail cleanly."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_LEARNING, TINY_RUN, TRACE_RUN, assert_learned
from tracerl.errors import CheckpointError
from tracerl.runlog import read_jsonl
from tracerl.train import Trainer, train
from tracerl.config import load_config

TIMING = {"rollout_s", "update_s", "predictor_s", "features_s"}  # wall seconds: never equal between runs


def _rows(run_dir: Path, name: str):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run_dir / name)]


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run([sys.executable, "-m", "tracerl.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.mark.slow
def test_cli_train_eval_report(tmp_path):
    run = tmp_path / "run"
    p = _cli("train", *TINY_LEARNING, f"run.dir={run}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert_learned(run)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward_mean", "em", "effective_ratio", "zero_adv_frac", "gen_tokens", "prefill_tokens",
                "tool_calls", "trajectories", "rollout_s", "update_s", "cum_gen_tokens"):
        assert key in rows[-1], key
    assert all(r["trajectories"] == 8 for r in rows)
    assert rows[-1]["cum_gen_tokens"] == sum(r["gen_tokens"] for r in rows)
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert (run / "config.yaml").is_file() and (run / "report.html").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_000002", "step_000004"]
    assert (run / "checkpoints" / "step_000004" / "model" / "model.safetensors").is_file()

    p = _cli("eval", str(run), "--split", "test", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["split"] == "test" and res["n"] == 16 and 0.0 <= res["em"] <= 1.0

    (run / "report.html").unlink()
    p = _cli("report", str(run))
    assert p.returncode == 0 and (run / "report.html").stat().st_size > 1000


TREE_RUN = ["rollout.allocator=tree_grpo", "algo.advantage=tree_grpo", "rollout.trees_per_prompt=2",
            "rollout.expansions=1", "rollout.rounds=1", "rollout.leaves_per_tree=2", "trainer.tree_log_every=2"]




def _full_and_half(tmp_path, extra):
    full, _ = train(None, [*TINY_LEARNING, *extra, f"run.dir={tmp_path / 'full'}"], log=lambda *_: None)
    half, _ = train(None, [*TINY_LEARNING, *extra, f"run.dir={tmp_path / 'half'}", "trainer.steps=2"],
                    log=lambda *_: None)
    assert_learned(full)
    assert_learned(half)
    return full, half


# chains under a step budget: the running cost estimates (chain tokens) size each wave and are checkpointed
BUDGET_RUN = ["rollout.token_budget=80", "trainer.tree_log_every=2"]


@pytest.mark.parametrize("extra", [[], TREE_RUN, TRACE_RUN, BUDGET_RUN], ids=["chains", "trees", "trace", "budget"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, extra):
    full, half = _full_and_half(tmp_path, extra)
    # a crash after step 2 would also leave rows of step 3: resume must drop them
    with open(half / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "reward_mean": 0.5}) + "\n")
    resumed, _ = train(None, ["trainer.steps=4"], resume=str(half), log=lambda *_: None)
    assert _rows(resumed, "metrics.jsonl") == _rows(full, "metrics.jsonl")
    assert _rows(resumed, "eval.jsonl") == _rows(full, "eval.jsonl")
    if extra:  # the trees themselves (tokens, log-probs, rewards, advantages) are reproduced
        assert (resumed / "trees" / "step_000004.jsonl").read_text() == (full / "trees" / "step_000004.jsonl").read_text()
        rows = read_jsonl(full / "metrics.jsonl")
    if extra is TREE_RUN:
        assert all(r["continuations"] == 2 * 2 * 1 and r["leaves"] == 2 * 2 * 2 for r in rows)
    if extra is TRACE_RUN:  # M = 8 / (1 + 2·f) bare rollouts over a pool of 4, f the running measured f
        assert [r["predictor_warm"] for r in rows] == [0, 1, 1, 1]
        assert all(r["pool_size"] == 4 and r["root_rollouts"] == r["stage1_rollouts"] + r["stage2_restarts"]
                   + r["stage2_leftover"] + r["budget_chains"] for r in rows)
        # each step plans with the f the previous one left (the prior first), carried across the resume
        assert rows[0]["f_planned"] == 0.5 and all(b["f_planned"] == a["f_running"] for a, b in zip(rows, rows[1:]))
        assert all(k in rows[-1] for k in ("predictor_loss", "predictor_brier", "predictor_ece", "prompts_used"))
    if extra is BUDGET_RUN:  # 2 prompts × 80 tokens, passed by at most the last wave's longest trajectory
        assert all(160 <= r["gen_tokens"] <= 160 + r["budget_last_wave_max"] for r in rows)


@pytest.mark.parametrize("skip", ["weights", "optimizer"])
def test_the_resume_test_fails_when_restoring_is_disabled(tmp_path, monkeypatch, skip):
    """The mutant check: the exact-resume comparison above catches a resume that restores the step and the
    random state but not the weights, or not the optimizer's moments."""
    from tracerl.distributed import Single

    full, half = _full_and_half(tmp_path, [])

    def broken(self, model, optimizer, weights, optim_state):
        if skip != "weights":
            model.load_state_dict(weights)
        if skip != "optimizer":
            optimizer.load_state_dict(optim_state)

    monkeypatch.setattr(Single, "load_state", broken)
    resumed, _ = train(None, ["trainer.steps=4"], resume=str(half), log=lambda *_: None)
    assert [r["step"] for r in read_jsonl(resumed / "metrics.jsonl")] == [1, 2, 3, 4]
    assert _rows(resumed, "metrics.jsonl") != _rows(full, "metrics.jsonl")


def test_full_disk_on_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = load_config(None, [*TINY_LEARNING, f"run.dir={tmp_path / 'r'}", "trainer.steps=2", "trainer.checkpoint_every=1"])
    tr = Trainer(cfg, log=lambda *_: None)
    tr.setup()
    tr.train_step(0)
    tr.save(1)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tracerl.checkpoint.save_file", no_space)
    with pytest.raises(CheckpointError) as e:
        tr.save(2)
    assert "no space left on device" in str(e.value) and "step_000001 is intact" in str(e.value)
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert names == ["step_000001"]  # no half-written checkpoint, no temp dir


@pytest.mark.parametrize("args,needle", [
    (["model.preset=path", "model.path=/no/such/model"], "/no/such/model does not exist"),
    (["trainer.lr=fast"], "config key 'trainer.lr'"),
    (["trainer.bogus=1"], "unknown config key 'trainer.bogus'"),
    (["env.options.train_size=0"], "train split"),
    (["algo.advantage=magic"], "valid: dr_grpo, grpo"),
    (["env.options.colour=blue"], "unknown option 'colour'"),
])
def test_bad_input_is_one_line(tmp_path, args, needle):
    p = _cli("train", *TINY_RUN, f"run.dir={tmp_path / 'r'}", *args)
    assert p.returncode == 2, (p.stdout[-500:], p.stderr[-2000:])
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], p.stderr[-2000:]


def test_bad_config_file_and_resume_of_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  steps: [1\n")
    p = _cli("train", "--config", str(bad))
    assert p.returncode == 2 and "not valid YAML" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = _cli("train", "--resume", str(tmp_path))
    assert p.returncode == 2 and "not a run directory" in p.stderr


def test_single_turn_arith_environment_trains(tmp_path):
    args = [a for a in TINY_LEARNING if not a.startswith("env.options.")]
    run, res = train(None, [*args, "env.name=arith", "env.max_turns=1", "env.options={train_size: 120, validation_size: 16}",
                            f"run.dir={tmp_path / 'a'}", "trainer.steps=2"], log=lambda *_: None)
    rows = read_jsonl(run / "metrics.jsonl")
    assert len(rows) == 2 and all(r["mean_turns"] == 1.0 and r["tool_calls"] == 0 for r in rows)
    assert all(r["grad_norm"] > 0 for r in rows)
    assert res["n"] == 8 and 0.0 <= res["em"] <= 1.0
