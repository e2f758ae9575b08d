import json
import re
import statistics

import pytest

from tracerl.cli import main
from tracerl.errors import TracerlError
from tracerl.report.compare import seed_summary, trailing_mean, write_comparison
from tracerl.runlog import format_number

CONFIG = """\
run: {{name: {name}, seed: {seed}}}
rollout: {{allocator: {allocator}, group_size: 4}}
algo: {{advantage: {advantage}, policy_loss: ppo_clip}}
"""


def fake_run(root, name, allocator, advantage, seed, tokens_per_step, val_em, steps=4, leaves=8, mixed=0):
    """A run dir written by hand: config.yaml, metrics.jsonl (steps 1..steps), eval.jsonl with
    validation rows at steps 0, 2, 4 ... (`val_em`) and a test row that must be ignored."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(CONFIG.format(name=name, seed=seed, allocator=allocator,
                                                       advantage=advantage))
    rows = [{"step": s, "cum_gen_tokens": tokens_per_step * s, "gen_tokens": tokens_per_step,
             "leaves": leaves, "effective_ratio": 0.1 * s, "mixed_anchors": mixed, "rollout_s": 2.0 + seed}
            for s in range(1, steps + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = [{"step": 2 * i, "split": "validation", "em": em, "n": 16} for i, em in enumerate(val_em)]
    evals.append({"step": steps, "split": "test", "em": 0.99, "n": 16})
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return run_dir


@pytest.fixture
def runs(tmp_path):
    return [
        fake_run(tmp_path, "chains-s0", "uniform", "grpo", 0, 100, [0.1, 0.2, 0.3]),
        fake_run(tmp_path, "tree-s0", "tree_grpo", "tree_grpo", 0, 50, [0.1, 0.3, 0.4], leaves=12, mixed=3),
        fake_run(tmp_path, "chains-s1", "uniform", "grpo", 1, 120, [0.1, 0.3, 0.5]),
        fake_run(tmp_path, "tree-s1", "tree_grpo", "tree_grpo", 1, 60, [0.1, 0.4, 0.6], leaves=12, mixed=5),
        fake_run(tmp_path, "tree-s2", "tree_grpo", "tree_grpo", 2, 55, [0.2, 0.4, 0.5], leaves=12, mixed=4),
    ]


def svgs(page):
    return re.findall(r"<svg.*?</svg>", page, re.S)


def table_rows(page, heading):
    table = page.split(f"<h2>{heading}</h2>", 1)[1].split("</table>", 1)[0]
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]]


def test_methods_pool_their_seeds(tmp_path, runs):
    out = write_comparison(runs, tmp_path / "out" / "cmp.html")
    page = out.read_text()
    assert out.name == "cmp.html" and "<script" not in page
    em_chart, ratio_chart = svgs(page)
    assert 'aria-label="Validation EM vs generated tokens"' in em_chart
    assert "Effective ratio" in ratio_chart
    for chart in (em_chart, ratio_chart):
        assert chart.count("<polyline") == 2  # one mean line per method
        assert chart.count('class="band"') == 2  # and a min-max band over its seeds
        assert "uniform + grpo (2 seeds)" in chart and "tree_grpo + tree_grpo (3 seeds)" in chart

    rows = {r[0]: r for r in table_rows(page, "Methods")}
    assert set(rows) == {"uniform + grpo", "tree_grpo + tree_grpo"}
    chains, tree = rows["uniform + grpo"], rows["tree_grpo + tree_grpo"]
    assert chains[1:3] == ["0, 1", "2"] and tree[1:3] == ["0, 1, 2", "3"]
    # final validation EM over seeds (the test split's 0.99 is not used)
    assert chains[3] == f"{format_number(0.4)} ± {format_number(statistics.stdev([0.3, 0.5]))}"
    assert tree[3] == f"{format_number(0.5)} ± {format_number(statistics.stdev([0.4, 0.6, 0.5]))}"
    assert chains[4] == format_number(440.0)  # mean of 400 and 480 generated tokens
    assert tree[5] == "12" and tree[7] == "4"  # leaves / step, mixed anchors / step
    assert chains[6] == format_number(0.25) and chains[8] == format_number(2.5)  # effective ratio, rollout s
    assert len(table_rows(page, "Runs")) == 5


def test_label_key_and_single_seed(tmp_path, runs):
    page = write_comparison(runs, tmp_path / "by-alloc.html", label_key="rollout.allocator").read_text()
    assert {r[0] for r in table_rows(page, "Methods")} == {"uniform", "tree_grpo"}
    one = write_comparison(runs[:1], tmp_path / "one.html", label_key="run.seed").read_text()
    assert [r[:3] for r in table_rows(one, "Methods")] == [["0", "0", "1"]]
    assert 'class="band"' not in one and one.count("<polyline") == 2  # a single seed: a line, no band
    assert table_rows(one, "Methods")[0][3] == format_number(0.3)  # no std of one value
    page = write_comparison(runs[:1], tmp_path / "missing.html", label_key="algo.nope").read_text()
    assert table_rows(page, "Methods")[0][0] == "no algo.nope"


def test_seed_summary_interpolates_on_the_common_budget():
    a = [(0.0, 0.1), (200.0, 0.2), (400.0, 0.3)]
    b = [(0.0, 0.1), (240.0, 0.3), (480.0, 0.5)]
    mean, band = seed_summary([b, a])
    assert [x for x, _ in mean] == [0.0, 200.0, 240.0, 400.0]  # b's 480 is beyond a's budget
    b_at_400 = 0.3 + 0.2 * 160 / 240
    assert mean[-1][1] == pytest.approx((0.3 + b_at_400) / 2)
    assert band[-1] == pytest.approx((400.0, 0.3, b_at_400))
    assert band[1] == pytest.approx((200.0, 0.2, 0.1 + 0.2 * 200 / 240))
    # no shared range: every point, averaged over the seeds that reach it
    mean, band = seed_summary([[(0.0, 1.0), (1.0, 1.0)], [(2.0, 3.0), (3.0, 5.0)]])
    assert mean == [(0.0, 1.0), (1.0, 1.0), (2.0, 3.0), (3.0, 5.0)]
    assert seed_summary([[], []]) == ([], [])
    assert trailing_mean([(1, 1.0), (2, 3.0), (3, 5.0), (4, 7.0)], 2) == [(1, 1.0), (2, 2.0), (3, 4.0), (4, 6.0)]


def test_labels_are_escaped(tmp_path):
    run = fake_run(tmp_path, "evil", "<img src=x onerror=alert(1)>", "grpo", 0, 10, [0.0, 0.1])
    page = write_comparison([run], tmp_path / "c.html").read_text()
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt; + grpo" in page


def test_cli_compare(tmp_path, runs, capsys):
    out = tmp_path / "cli.html"
    assert main(["compare", *map(str, runs[:2]), "--out", str(out), "--label-key", "rollout.allocator"]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run directory") and err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", str(empty), "--out", str(out)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    with pytest.raises(TracerlError, match="is a directory"):
        write_comparison(runs[:1], tmp_path)


def test_predictor_calibration_is_plotted_only_for_runs_that_have_a_predictor(tmp_path):
    chains = fake_run(tmp_path, "chains", "uniform", "grpo", 0, 100, [0.1, 0.2, 0.3])
    trace = fake_run(tmp_path, "trace", "trace", "tree_grpo", 0, 100, [0.1, 0.2, 0.3])
    rows = [json.loads(x) for x in (trace / "metrics.jsonl").read_text().splitlines()]
    (trace / "metrics.jsonl").write_text("".join(json.dumps({**r, "predictor_ece": 0.3 - 0.05 * r["step"]}) + "\n"
                                                 for r in rows))
    page = write_comparison([chains], tmp_path / "a.html").read_text()
    assert "Success-predictor ECE" not in page  # no predictor: no empty chart
    page = write_comparison([chains, trace], tmp_path / "b.html").read_text()
    assert "Success-predictor ECE" in page
