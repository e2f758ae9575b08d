"""What a resume may change: result-changing keys refused unless --allow-change (then recorded), keys that
define the checkpoint never, a damaged config.yaml never read as the defaults, a config written before newer
keys existed read with the values its run had, the tokenizer from the checkpoint."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import yaml
from transformers import AutoTokenizer

from conftest import TINY_LEARNING, TRACE_RUN
from tracerl import resume_rules, rundir
from tracerl.checkpoint import MANIFEST_FILE, build_manifest, latest_checkpoint
from tracerl.config import CONFIG_END, Config, ConfigError, describe_fields, dump_config
from tracerl.errors import TracerlError
from tracerl.runlog import read_jsonl
from tracerl.train import Trainer, resume_config, train

QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def half_run(tmp_path_factory):
    """A 2-step TRACE run with a checkpoint at step 2 (copied per test); its predictor (warm from step 2, in the
    checkpoint) trained without task features, as every run did before predictor.task_features existed."""
    run, _ = train(None, [*TINY_LEARNING, *TRACE_RUN, f"run.dir={tmp_path_factory.mktemp('r') / 'half'}",
                          "trainer.steps=2", "trainer.tensorboard=false", "predictor.task_features=false"], **QUIET)
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


# ---- runs written before newer keys existed ---------------------------------------------------------------
# The writer of 7d3214f (the first with these resume rules) knew none of the keys added since.
SINCE_7D3214F = [g for g in resume_rules.SCHEMA_ADDED if g.split()[0] in
                 ("b2815a8", "e13634b", "18bc1e9", "f8f439c", "9ea0509", "b8db8fa", "163adbb", "7a6431a")]


def _old_text(tree: dict, groups=SINCE_7D3214F) -> str:
    """`tree` as an older writer wrote it: without the keys of `groups`, as plain YAML (no first and last line)."""
    tree = copy.deepcopy(tree)
    for key in frozenset().union(*(resume_rules.SCHEMA_ADDED[g] for g in groups)):
        section, _, name = key.partition(".")
        tree[section].pop(name)
        if not tree[section]:
            del tree[section]
    return yaml.safe_dump(tree, sort_keys=False)


def _make_old(run):
    """config.yaml and every checkpoint's copy (with its manifest entry) as the writer of 7d3214f left them."""
    for f in [run / rundir.CONFIG_FILE, *(run / rundir.CHECKPOINT_DIR).glob(f"step_*/{rundir.CONFIG_FILE}")]:
        f.write_text(_old_text(yaml.safe_load(f.read_text())))
        if f.parent != run:
            (f.parent / MANIFEST_FILE).write_text(json.dumps(build_manifest(f.parent), indent=1))


def test_a_run_written_before_newer_keys_resumes_with_the_values_it_had(run, capsys, tmp_path, monkeypatch):
    from tracerl.cli import main

    _make_old(run)
    old = shutil.copytree(run, tmp_path / "again")
    assert main(["train", "--resume", str(run), "trainer.steps=3"]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(run / rundir.CONFIG_FILE) in warnings[0], warnings
    newer = len(frozenset().union(*(resume_rules.SCHEMA_ADDED[g] for g in SINCE_7D3214F)))
    assert all(k in warnings[0] for k in (f"written before {newer} config keys", "engine.*", "lora.*", "data.*",
                                          "alloc.cost_ema", "predictor.task_features=false"))
    rows = read_jsonl(run / rundir.METRICS_FILE)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["predictor_warm"] == 1
    # config.yaml is now the config the run follows, complete; the new checkpoint holds the same
    text = (run / rundir.CONFIG_FILE).read_text()
    step3 = latest_checkpoint(run / rundir.CHECKPOINT_DIR)
    assert step3.name == "step_000003" and (step3 / rundir.CONFIG_FILE).read_text() == text
    assert text.endswith(CONFIG_END + "\n") and yaml.safe_load(text)["predictor"]["task_features"] is False
    (line,) = _history(run)  # the keys the config predates are no change
    assert line["changes"] == {"trainer.steps": {"before": 2, "after": 3}} and line["needed_allow_change"] == []
    # the mutant: read as the current default (true), the old run's predictor does not fit
    monkeypatch.setattr(resume_rules, "LEGACY_DEFAULTS", {})
    with pytest.raises(TracerlError, match="saved predictor has"):
        train(None, [], resume=str(old), **QUIET)


def test_report_and_eval_read_a_run_written_before_newer_keys(run, capsys):
    from tracerl.cli import main

    _make_old(run)
    assert main(["report", str(run)]) == 0
    assert main(["eval", str(run), "--n", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["n"] for line in out.splitlines() if line.startswith("{")] == [2]
    assert err.count("warning") == 1 and "predictor.task_features=false" in err
    assert (run / "report.html").stat().st_size > 1000 and (run / rundir.EVAL_CLI_FILE).is_file()


def _cut_before(text: str, line: str) -> str:
    return text[: text.index(line)]


FULL, KEYS = Config().model_dump(mode="json"), len(describe_fields())


@pytest.mark.parametrize("text,problem", [
    (_cut_before(dump_config(Config()), "lora:\n"), f"its last line '{CONFIG_END}' is missing"),
    (dump_config(Config()).replace("  tis_cap: 2.0\n", ""), f"it holds {KEYS - 1} keys, its first line says {KEYS}"),
    (_old_text(FULL)[:-3], "it ends inside a line"),  # files from before the first and last line
    (_cut_before(_old_text(FULL, []), "  loggers:"), "it lacks engine.name"),  # 18bc1e9's algo keys are there
    (_old_text(FULL) + "lora:\n", "section lora holds no keys"),
    (_old_text(FULL).replace("  lr: 0.0001\n", ""), "it lacks trainer.lr"),
], ids=["marked-cut-at-a-section", "marked-key-removed", "cut-inside-a-line", "cut-inside-a-commit's-keys",
        "empty-section", "first-schema-key-removed"])
def test_a_cut_config_is_damaged_not_old(tmp_path, text, problem):
    f = tmp_path / "config.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match="truncated or damaged") as e:
        resume_rules.read_run_config(f)
    assert problem in str(e.value) and str(f) in str(e.value)


def test_old_writers_are_read_by_the_schema_history(tmp_path):
    f = tmp_path / "config.yaml"
    for groups in ([], SINCE_7D3214F, list(resume_rules.SCHEMA_ADDED)):  # up to the first schema (08536a9)
        f.write_text(_old_text(FULL, groups))
        saved = resume_rules.read_run_config(f)
        assert set(saved.predates) == frozenset().union(*(resume_rules.SCHEMA_ADDED[g] for g in groups))
        assert saved.config() == Config(predictor={"task_features": not groups})
    f.write_text(dump_config(Config()))
    assert resume_rules.read_run_config(f).predates == ()
    # the history is a partition of keys the schema still has (a removed key would need its own rule)
    history = [resume_rules.SCHEMA_BASE, *resume_rules.SCHEMA_ADDED.values()]
    assert sum(map(len, history)) == len(frozenset().union(*history))
    assert frozenset().union(*history) <= {k for k, _, _ in describe_fields()}
    assert set(resume_rules.LEGACY_DEFAULTS) <= frozenset().union(*resume_rules.SCHEMA_ADDED.values())
