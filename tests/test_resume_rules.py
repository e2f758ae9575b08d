"""What a resume may change: result-changing keys refused unless --allow-change (then recorded), keys that
define the checkpoint never, a damaged config.yaml never read as the defaults, the tokenizer from the
checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from transformers import AutoTokenizer

from conftest import TINY_LEARNING
from tracerl import resume_rules, rundir
from tracerl.checkpoint import latest_checkpoint
from tracerl.config import ConfigError
from tracerl.train import Trainer, resume_config, train

QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def half_run(tmp_path_factory):
    """A 2-step run with a checkpoint at step 2 (copied per test)."""
    run, _ = train(None, [*TINY_LEARNING, f"run.dir={tmp_path_factory.mktemp('r') / 'half'}", "trainer.steps=2",
                          "trainer.tensorboard=false"], **QUIET)
    return run


@pytest.fixture
def run(half_run, tmp_path):
    return shutil.copytree(half_run, tmp_path / "run")


def _history(run):
    f = run / rundir.CONFIG_HISTORY_FILE
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


@pytest.mark.parametrize("override,named", [("run.seed=5", "run.seed 0 -> 5"),
                                             ("trainer.lr=0.5", "trainer.lr 0.001 -> 0.5"),
                                             ("rollout.allocator=tree_grpo", "rollout.allocator")])
def test_a_result_changing_key_is_refused_without_allow_change(run, override, named):
    before = (run / rundir.CONFIG_FILE).read_text()
    with pytest.raises(ConfigError, match="resume would change") as e:
        train(None, [override], resume=str(run), **QUIET)
    msg = str(e.value)
    assert named in msg and "--allow-change" in msg and "\n" not in msg
    assert (run / rundir.CONFIG_FILE).read_text() == before and _history(run) == []


@pytest.mark.parametrize("override,named", [("env.options.n_entities=150", "env.options"),
                                             ("model.hidden_size=96", "model.hidden_size 64 -> 96"),
                                             ("sft.steps=31", "sft.steps")])
def test_keys_that_define_the_checkpoint_never_change(run, override, named):
    with pytest.raises(ConfigError, match="resume cannot change") as e:
        train(None, [override], resume=str(run), allow_change=True, **QUIET)
    assert named in str(e.value) and "start a new run" in str(e.value)


def test_an_allowed_change_is_applied_and_recorded(run):
    out, _ = train(None, ["trainer.lr=0.0005", "trainer.steps=3"], resume=str(run), allow_change=True, **QUIET)
    assert yaml.safe_load((out / rundir.CONFIG_FILE).read_text())["trainer"]["lr"] == 0.0005
    (line,) = _history(out)
    assert line["step"] == 2 and line["needed_allow_change"] == ["trainer.lr"]
    assert line["changes"]["trainer.lr"] == {"before": 0.001, "after": 0.0005}
    assert line["changes"]["trainer.steps"] == {"before": 2, "after": 3}
    # the step-3 checkpoint holds the config it was trained under: resuming it again changes nothing
    saved = yaml.safe_load((latest_checkpoint(out / rundir.CHECKPOINT_DIR) / rundir.CONFIG_FILE).read_text())
    assert saved["trainer"]["lr"] == 0.0005
    cfg, diff = resume_config(out, ["trainer.steps=3"], allow_change=False)
    assert diff == {} and cfg.trainer.lr == 0.0005


def test_extending_a_run_and_no_effect_keys_need_no_flag(run):
    cfg, diff = resume_config(run, ["trainer.steps=4", "trainer.keep_checkpoints=5", "run.dist_timeout_s=30"],
                              allow_change=False)
    assert set(diff) == {"trainer.steps", "trainer.keep_checkpoints", "run.dist_timeout_s"}
    # ... except where a schedule is a fraction of trainer.steps (the distillation weight's defaults)
    with pytest.raises(ConfigError, match="trainer.steps"):
        resume_config(run, ["trainer.steps=4", "distill.mode=all_tokens"], allow_change=False)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_a_damaged_config_is_never_read_as_the_defaults(run, damage):
    f = run / rundir.CONFIG_FILE
    text = f.read_text()
    f.write_text({"empty": "", "truncated": text[: len(text) // 2].rsplit("\n", 1)[0] + "\n",
                  "garbage": "\x00\x01 not: [yaml"}[damage])
    warnings = []
    cfg, diff = resume_config(run, [], allow_change=False, log=warnings.append)  # the checkpoint's copy
    assert diff == {} and cfg.trainer.lr == 0.001 and cfg.model.hidden_size == 64
    assert len(warnings) == 1 and str(f) in warnings[0] and "using the copy in step_000002" in warnings[0]
    with pytest.raises(ConfigError, match="empty or damaged|truncated or damaged|cannot be read") as e:
        resume_rules.read_run_config(f)  # what a resume without the checkpoint's copy gets, in one line
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_the_tokenizer_comes_from_the_checkpoint(run, monkeypatch):
    import tracerl.train

    real = tracerl.train.load_policy

    def rebuilt_cache(path, **kw):  # the warm start's tokenizer has changed since the checkpoint was written
        model, tok = real(path, **kw)
        tok.add_tokens(["<new-entity>"])
        return model, tok

    monkeypatch.setattr(tracerl.train, "load_policy", rebuilt_cache)
    cfg, _ = resume_config(run, [], allow_change=False)
    tr = Trainer(cfg, resume=run, **QUIET)
    tr.setup()
    try:
        ckpt = latest_checkpoint(run / rundir.CHECKPOINT_DIR)
        saved = AutoTokenizer.from_pretrained(ckpt / rundir.CHECKPOINT_MODEL_DIR, local_files_only=True)
        assert tr.checkpoint == ckpt and tr.tokenizer.get_vocab() == saved.get_vocab()
        assert "<new-entity>" not in tr.tokenizer.get_vocab()
    finally:
        tr.release()


def test_resuming_a_finished_run_repeats_nothing_and_clears_debris(run):
    from tracerl.runlog import read_jsonl

    evals = read_jsonl(run / rundir.EVAL_FILE)
    debris = run / rundir.CHECKPOINT_DIR / ".pruning-step_000001"  # a kill inside pruning left this
    (debris / "model").mkdir(parents=True)
    out, result = train(None, [], resume=str(run), **QUIET)
    assert read_jsonl(out / rundir.EVAL_FILE) == evals  # the final evaluation is not run or logged again
    final = {k: v for k, v in evals[-1].items() if k not in ("step", "split")}
    assert evals[-1]["step"] == 2 and result == final
    assert not debris.exists()
