"""The evaluation table on QA data: breakdown numerics, the report section and `tracerl eval` end to end."""

import json
from pathlib import Path

import pytest
import torch

from tracerl.envs.base import Task
from tracerl.evaluate import breakdown, gold_recall, summarize
from tracerl.report.html import render_report
from tracerl.report.rundir import read_run
from tracerl.rundir import BREAKDOWN_FILE
from tracerl.rollout import Trajectory

FIXTURES = Path(__file__).parent / "fixtures"


def _traj(dataset, qtype, hops, em, turns, errors=0, recall=None, gold=("g1", "g2")):
    meta = {"dataset": dataset, "type": qtype, "hops": hops, "gold_ids": list(gold)}
    t = Trajectory(Task(f"{dataset}-{qtype}-{em}", "q?", ("a",), meta), 0, [], [], [], 0, {})
    t.turns = [{"format_error": "no_action" if i < errors else None, "tool_call": False} for i in range(turns)]
    t.reward = em
    t.info = {"em": em, "f1": em}
    if recall is not None:
        t.info["gold_recall"] = recall
    return t


TRAJS = [
    _traj("hotpotqa", "bridge", 2, 1.0, 3, recall=1.0),
    _traj("hotpotqa", "bridge", 2, 0.0, 2, errors=1, recall=0.5),
    _traj("hotpotqa", "comparison", 2, 1.0, 1, recall=None),  # answered without searching: recall 0
    _traj("musique", "2hop", 2, 0.0, 4, errors=4, recall=0.0),
    _traj("musique", "3hop1", 3, 1.0, 4, recall=2 / 3),
]


def test_breakdown_rows_by_hand():
    rows = {(r["dataset"], r["type"], r["hops"]): r for r in breakdown(TRAJS)}
    assert list(rows) == [("hotpotqa", "all", "all"), ("hotpotqa", "bridge", "all"), ("hotpotqa", "comparison", "all"),
                          ("musique", "all", "all"), ("musique", "2hop", "all"), ("musique", "3hop1", "all"),
                          ("musique", "all", "2"), ("musique", "all", "3"), ("all", "all", "all")]
    hp = rows[("hotpotqa", "all", "all")]  # one hop count only: no per-hop rows for hotpotqa
    assert hp["n"] == 3 and hp["em"] == pytest.approx(2 / 3) and hp["mean_turns"] == pytest.approx(2.0)
    assert hp["format_error_rate"] == pytest.approx(1 / 6) and hp["gold_recall"] == pytest.approx(0.5)
    assert rows[("hotpotqa", "bridge", "all")]["gold_recall"] == pytest.approx(0.75)
    assert rows[("musique", "2hop", "all")]["format_error_rate"] == 1.0
    assert rows[("musique", "all", "3")]["gold_recall"] == pytest.approx(2 / 3)
    total = rows[("all", "all", "all")]
    assert total["n"] == 5 and total["em"] == pytest.approx(0.6) and total["gold_recall"] == pytest.approx((1.5 + 2 / 3) / 5)
    assert set(total) == {"dataset", "type", "hops", "n", "em", "f1", "mean_turns", "format_error_rate", "gold_recall"}


def test_no_breakdown_or_recall_without_qa_meta():
    plain = [_traj("x", "y", 1, 1.0, 1, recall=1.0, gold=())]
    for t in plain:
        t.task.meta.clear()
    assert breakdown(plain) == [] and gold_recall(plain) == {} and "gold_recall" not in summarize(plain)


def test_report_shows_the_latest_breakdown(tmp_path):
    rows = breakdown(TRAJS)
    with open(tmp_path / BREAKDOWN_FILE, "w") as f:
        f.write(json.dumps({"model": "m", "split": "test", "rows": [{**rows[0], "em": 0.111}]}) + "\n")
        f.write(json.dumps({"model": "m", "split": "test", "rows": rows}) + "\n")
    page = render_report(read_run(tmp_path))
    assert "Evaluation by dataset and question type" in page and "split test · model m" in page
    assert "3hop1" in page and "0.111" not in page  # the latest evaluation of (model, split) wins
    (tmp_path / BREAKDOWN_FILE).unlink()
    assert "Evaluation by dataset" not in render_report(read_run(tmp_path))


def test_eval_command_end_to_end(tmp_path, capsys):
    """`tracerl eval MODEL --config real_qa.yaml --split test --out DIR` on a tiny random model."""
    from tracerl.cli import main
    from tracerl.models.io import atomic_save_pretrained
    from tracerl.models.tiny import build_tiny_model, train_tokenizer

    questions = [json.loads(line)["question"] for line in (FIXTURES / "real_qa_tiny.jsonl").read_text().splitlines()]
    tok = train_tokenizer(questions, vocab_size=300)
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=0)
    atomic_save_pretrained(model, tok, tmp_path / "model")
    config = tmp_path / "real_qa.yaml"
    config.write_text(f"""
model: {{preset: path, path: {tmp_path / 'model'}, max_context: 512}}
env:
  name: real_qa
  max_turns: 2
  options: {{data_root: {FIXTURES}, test_files: [real_qa_tiny.jsonl], top_k: 2}}
rollout: {{max_turn_tokens: 8}}
""")
    out = tmp_path / "eval"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # run.threads holds for `tracerl eval` as for `tracerl train`
        assert main(["eval", str(tmp_path / "model"), "--config", str(config), "--split", "test", "--out", str(out),
                     "--json", "run.threads=1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "by dataset and question type (test)" in printed and "2wikimultihopqa" in printed
    result = json.loads(printed.strip().splitlines()[-2])  # the JSON line, then the report path
    assert result["n"] == 4 and "gold_recall" in result
    assert [r["dataset"] for r in result["breakdown"]] == ["2wikimultihopqa", "hotpotqa", "hotpotqa", "hotpotqa", "musique", "all"]
    logged = json.loads((out / BREAKDOWN_FILE).read_text())
    assert logged["split"] == "test" and logged["rows"] == result["breakdown"]
    assert "Evaluation by dataset and question type" in (out / "report.html").read_text()


def test_eval_preset_needs_a_config(capsys):
    from tracerl.cli import main

    assert main(["eval", "preset"]) == 2
    assert "pass --config FILE.yaml" in capsys.readouterr().err


def test_overrides_may_follow_options(tmp_path, capsys):
    """`tracerl eval RUN --split test env.options.x=1`: argparse alone rejects the trailing override."""
    from tracerl.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{preset: path, path: {tmp_path}}}\n"
                      f"env: {{name: real_qa, options: {{data_root: {FIXTURES}, test_files: real_qa_tiny.jsonl}}}}\n")
    assert main(["eval", "preset", "--config", str(config), "--split", "test", "env.options.max_per_file=0"]) == 2
    assert "env.options.max_per_file" in capsys.readouterr().err  # the override reached the environment
    with pytest.raises(SystemExit):
        main(["eval", "preset", "--split", "test", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
