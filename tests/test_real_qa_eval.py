"""The evaluation table on QA data: breakdown numerics, the report section and `tracerl eval` end to end."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from tracerl.envs.base import Task
from tracerl.evaluate import breakdown, gold_recall, squad_scores, summarize
from tracerl.report.html import render_report
from tracerl.report.rundir import read_run
from tracerl.rundir import BREAKDOWN_FILE
from tracerl.rollout import Trajectory

FIXTURES = Path(__file__).parent / "fixtures"


def _traj(dataset, qtype, hops, em, turns, errors=0, recall=None, gold=("g1", "g2"), answer=None, golds=("Veloria",)):
    meta = {"dataset": dataset, "type": qtype, "hops": hops, "gold_ids": list(gold)}
    history = [] if answer is None else [{"action": "answer", "answer": answer}]
    t = Trajectory(Task(f"{dataset}-{qtype}-{em}", "q?", tuple(golds), meta), 0, [], [], [], 0, {"history": history})
    t.turns = [{"format_error": "no_action" if i < errors else None, "tool_call": False} for i in range(turns)]
    t.reward = em
    t.info = {"em": em, "f1": em}
    if recall is not None:
        t.info["gold_recall"] = recall
    return t


TRAJS = [  # em / f1 as the reward's matching (tracerl) scored each answer
    _traj("hotpotqa", "bridge", 2, 1.0, 3, recall=1.0, answer="the Veloria"),
    _traj("hotpotqa", "bridge", 2, 0.0, 2, errors=1, recall=0.5, answer="Tarsland"),
    _traj("hotpotqa", "comparison", 2, 1.0, 1, recall=None, answer="“1,000”", golds=("1000",)),  # answered without searching: recall 0
    _traj("musique", "2hop", 2, 0.0, 4, errors=4, recall=0.0),  # no answer
    _traj("musique", "3hop1", 3, 1.0, 4, recall=2 / 3, answer="7.0", golds=("7",)),
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
    assert set(total) == {"dataset", "type", "hops", "n", "em", "f1", "em_squad", "f1_squad", "mean_turns",
                          "format_error_rate", "gold_recall"}


def test_breakdown_rows_have_squad_scores_of_the_same_answers():
    """SQuAD matching keeps "the Veloria" = "Veloria" but not the typographic quotes, the thousands comma or 7.0 = 7."""
    rows = {(r["dataset"], r["type"], r["hops"]): r for r in breakdown(TRAJS)}
    hp, mu, total = rows[("hotpotqa", "all", "all")], rows[("musique", "all", "all")], rows[("all", "all", "all")]
    assert hp["em"] == pytest.approx(2 / 3) and hp["em_squad"] == pytest.approx(1 / 3) and hp["f1_squad"] == pytest.approx(1 / 3)
    assert rows[("hotpotqa", "comparison", "all")]["em_squad"] == 0.0 and rows[("hotpotqa", "bridge", "all")]["em_squad"] == 0.5
    assert mu["em"] == pytest.approx(0.5) and mu["em_squad"] == 0.0 and mu["f1_squad"] == 0.0
    assert total["em"] == pytest.approx(0.6) and total["em_squad"] == pytest.approx(0.2)
    assert total["em_squad"] == squad_scores(TRAJS)["em_squad"]


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
    assert "<th>em_squad</th><th>f1_squad</th>" in page
    (tmp_path / BREAKDOWN_FILE).unlink()
    assert "Evaluation by dataset" not in render_report(read_run(tmp_path))


def _tiny_real_qa(tmp_path) -> Path:
    """A tiny random model in tmp_path/model and a real_qa config on the test fixture; the config's path."""
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
    return config


def test_eval_command_end_to_end(tmp_path, capsys):
    """`tracerl eval MODEL --config real_qa.yaml --split test --out DIR` on a tiny random model."""
    from tracerl.cli import main

    config = _tiny_real_qa(tmp_path)
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
    assert "by dataset and question type (test)" in printed and "2wikimultihopqa" in printed and "EM (squad)" in printed
    result = json.loads(printed.strip().splitlines()[-2])  # the JSON line, then the report path
    assert result["n"] == 4 and "gold_recall" in result
    assert [r["dataset"] for r in result["breakdown"]] == ["2wikimultihopqa", "hotpotqa", "hotpotqa", "hotpotqa", "musique", "all"]
    assert result["breakdown"][-1]["em_squad"] == result["em_squad"]  # per dataset too, the total row = the summary
    logged = json.loads((out / BREAKDOWN_FILE).read_text())
    assert logged["split"] == "test" and logged["rows"] == result["breakdown"]
    assert "Evaluation by dataset and question type" in (out / "report.html").read_text()


def test_bench_script_records_both_matchings(tmp_path, monkeypatch):
    """bench/real_qa_eval.py run as a script: the summary, every breakdown row and every episode carry
    em_squad / f1_squad, and each episode its final answer (None when it gave none, scoring 0)."""
    config = _tiny_real_qa(tmp_path)
    out = tmp_path / "result.json"
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    monkeypatch.setattr(sys, "argv", ["real_qa_eval.py", "--config", str(config), "--model", str(tmp_path / "model"),
                                      "--per-file", "3", "--probe", "1", "--out", str(out)])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(REPO / "bench" / "real_qa_eval.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    episodes = result["episodes"]
    assert len(episodes) == 3 and all({"answer", "em", "f1", "em_squad", "f1_squad"} <= set(e) for e in episodes)
    assert all(e["em_squad"] == e["f1_squad"] == 0.0 for e in episodes if e["answer"] is None)
    assert result["summary"]["em_squad"] == pytest.approx(sum(e["em_squad"] for e in episodes) / 3)
    assert result["summary"]["f1_squad"] == pytest.approx(sum(e["f1_squad"] for e in episodes) / 3)
    rows = result["breakdown"]
    assert rows[-1]["dataset"] == "all" and rows[-1]["em_squad"] == result["summary"]["em_squad"]
    assert all("em_squad" in r and "f1_squad" in r for r in rows)


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
