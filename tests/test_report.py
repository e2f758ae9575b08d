import math
import re

import pytest

from tracerl.report import write_report
from tracerl.report.html import nice_ticks
from tracerl.report.rundir import config_summary, read_run
from tracerl.runlog import RunLogger

CONFIG = """\
run: {name: tiny-trace, seed: 7}
model: {preset: tiny, path: null}
env: {name: multihop, seed: 1}
algo: {advantage: grpo, policy_loss: ppo_clip}
trainer: {steps: 6}
sft: {steps: 800, seed: 3}
"""


def make_run(run_dir, steps=6, evals=True, config=CONFIG):
    run_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (run_dir / "config.yaml").write_text(config)
    with RunLogger(run_dir, tensorboard=False) as log:
        for step in range(1, steps + 1):
            log.log_step(step, {
                "reward_mean": 0.1 * step, "em": 0.05 * step, "effective_ratio": 0.5,
                "zero_adv_frac": 0.25, "gen_tokens": 1000 + step, "rollout_s": 2.0,
                "update_s": 1.0, "loss": 0.01, "lr": 1e-6,
            })
            if evals and step % 3 == 0:
                log.log_eval(step, "val", {"em": 0.04 * step, "f1": 0.3, "n": 50})
    return run_dir


def svgs(page):
    return re.findall(r"<svg.*?</svg>", page, re.S)


def polyline_lengths(svg):
    return [len(p.split()) for p in re.findall(r'<polyline[^>]*points="([^"]*)"', svg)]


def test_report_has_one_svg_per_chart_with_one_point_per_row(tmp_path):
    page = write_report(make_run(tmp_path / "run")).read_text()
    charts = svgs(page)
    # 6 curves against step + reward and EM against cumulative generated tokens
    assert len(charts) == 8
    titles = [re.search(r'aria-label="([^"]*)"', s).group(1) for s in charts]
    assert "Mean reward" in titles and "Exact match vs generated tokens" in titles
    for svg in charts:
        assert "<text" in svg and 'class="tick"' in svg and 'class="label"' in svg
        lengths = polyline_lengths(svg)
        assert lengths
        # train lines have one point per step; validation EM one per eval row (steps 3 and 6)
        assert all(n in (6, 2) for n in lengths)
    em = charts[titles.index("Exact match")]
    assert sorted(polyline_lengths(em)) == [2, 6]
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "tiny-trace" in page and "multihop" in page and "ppo_clip" in page


def test_report_escapes_names_and_config(tmp_path):
    evil = 'run_name: "<script>alert(1)</script>"\nmodel: {name: "<img src=x onerror=alert(2)>"}\n'
    page = write_report(make_run(tmp_path / "run", config=evil)).read_text()
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_report_without_eval_or_config_and_with_nan(tmp_path):
    run_dir = make_run(tmp_path / "run", evals=False, config=None)
    with RunLogger(run_dir, tensorboard=False) as log:
        log.log_step(7, {"reward_mean": math.nan, "em": 0.5})
    (run_dir / "eval.jsonl").unlink()
    page = write_report(run_dir).read_text()
    assert "No evaluation yet" in page
    reward = next(s for s in svgs(page) if 'aria-label="Mean reward"' in s)
    assert polyline_lengths(reward) == [6]  # the NaN step is a gap, not a point
    assert "nan" not in " ".join(re.findall(r'points="([^"]*)"', page)).lower()


def test_report_for_a_single_step_and_an_empty_run(tmp_path):
    page = write_report(make_run(tmp_path / "one", steps=1, evals=False)).read_text()
    assert all(set(polyline_lengths(s)) == {1} for s in svgs(page))
    assert "<circle" in page  # a one-point line is still visible
    empty = tmp_path / "empty"
    empty.mkdir()
    page = write_report(empty).read_text()
    assert not svgs(page) and "Nothing to plot yet" in page


def test_missing_keys_are_listed_not_drawn(tmp_path):
    run_dir = tmp_path / "run"
    with RunLogger(run_dir, tensorboard=False) as log:
        log.log_step(1, {"reward_mean": 0.5})
        log.log_step(2, {"reward_mean": 0.6})
    page = write_report(run_dir).read_text()
    assert len(svgs(page)) == 1
    assert "Not logged:" in page and "Seconds per step" in page


def test_read_run_and_config_summary(tmp_path):
    run = read_run(make_run(tmp_path / "run"))
    assert run.name == "tiny-trace"
    assert len(run.metrics) == 6 and [r["step"] for r in run.evals] == [3, 6]
    assert config_summary(run.config) == {
        "model": "tiny", "env": "multihop", "estimator": "grpo", "loss": "ppo_clip",
        "steps": "6", "seed": "7",
    }
    other = {"run_name": "x", "model": {"name": "m"}, "adv": {"estimator": "tree"}, "seed": 1}
    assert config_summary(other) == {"model": "m", "estimator": "tree", "seed": "1"}
    with pytest.raises(FileNotFoundError):
        read_run(tmp_path / "nope")


RANGES = [(0.0, 1.0), (1.0, 1.0), (0.0, 0.0), (3.0, 1234567.0), (-0.2, 0.05)]


@pytest.mark.parametrize("lo,hi", RANGES)
def test_nice_ticks_cover_the_range(lo, hi):
    ticks = nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and ticks[0] < ticks[-1]
    assert 3 <= len(ticks) <= 12
