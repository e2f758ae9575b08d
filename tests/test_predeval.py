"""`tracerl predictor-eval` (tracerl.predeval): the metrics against hand-computed values, the bootstrap and
the logistic fit against what they must equal, and the harness end to end on a tiny logged run."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from conftest import TINY_RUN
from tracerl.allocate.predictor import auroc, brier, ece
from tracerl.predeval import (CEILING, PREDICTORS, EvalOptions, PredictorEvalError, auroc_replicates, cluster_weights,
                              evaluate_predictors, fit_logistic, parse_steps, score, verdict)

# ---------------------------------------------------------------------------------- metrics by hand

# four single-leaf prefixes: outcomes 0, 0, 1, 1 predicted 0.1, 0.4, 0.35, 0.8
P, S, FAIL = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], [1, 1, 0, 0]


def test_metrics_match_hand_computed_values():
    # AUROC: of the 4 (success, failure) pairs, (0.35 vs 0.1), (0.8 vs 0.1), (0.8 vs 0.4) rank right: 3/4
    assert auroc(P, S, FAIL) == pytest.approx(0.75)
    # Brier: (0.1² + 0.4² + 0.65² + 0.2²) / 4
    assert brier(P, S, FAIL) == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    # ECE, 10 bins: each prediction alone in its bin, |outcome − p| averaged
    assert ece(P, S, FAIL) == pytest.approx((0.1 + 0.4 + 0.65 + 0.2) / 4)
    # a node with 2 successes and 1 failure counts 3 pairs; a tie between classes counts half
    assert auroc([0.5, 0.2], [2, 0], [1, 1]) == pytest.approx((2 * (1 + 0.5)) / (2 * 2))
    assert brier([0.5, 0.2], [2, 0], [1, 1]) == pytest.approx((2 * 0.25 + 0.25 + 0.04) / 4)
    # ECE: bin 5 holds 3 pairs at p 0.5 with rate 2/3, bin 2 one pair at 0.2 with rate 0
    assert ece([0.5, 0.2], [2, 0], [1, 1]) == pytest.approx((3 * abs(2 / 3 - 0.5) + 0.2) / 4)
    assert auroc([0.3, 0.6], [1, 2], [0, 0]) is None  # one outcome only


def test_replicate_auroc_equals_the_pair_auroc_of_the_resampled_data():
    rng = random.Random(0)
    p = np.array([round(rng.random(), 1) for _ in range(60)])  # rounded: many ties
    s = np.array([rng.randint(0, 3) for _ in range(60)], dtype=float)
    f = np.array([rng.randint(0, 3) for _ in range(60)], dtype=float)
    w = np.array([[rng.randint(0, 3) for _ in range(60)] for _ in range(5)], dtype=float)
    got = auroc_replicates(p, s, f, np.vstack([np.ones(60), w]))
    assert got[0] == pytest.approx(auroc(p.tolist(), s.tolist(), f.tolist()))
    for b in range(5):  # weight k = the node drawn k times
        rows = [i for i in range(60) for _ in range(int(w[b, i]))]
        assert got[b + 1] == pytest.approx(auroc(p[rows].tolist(), s[rows].tolist(), f[rows].tolist()))
    assert np.isnan(auroc_replicates(p, s, np.zeros(60), np.ones((1, 60))))[0]


def test_cluster_bootstrap_resamples_whole_prompts():
    clusters = ["a", "a", "b", "c", "c", "c"]
    w = cluster_weights(clusters, 200, seed=0)
    assert w.shape == (200, 6)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 5]).all()  # a prompt's prefixes move together
    assert (w[:, [0, 2, 3]].sum(1) == 3).all()  # 3 prompts drawn per replicate


def test_logistic_fit_recovers_group_rates_and_shrinks_with_l2():
    # one binary feature: the fitted probabilities are the two groups' (weighted, soft) success rates
    x = torch.tensor([[0.0]] * 4 + [[1.0]] * 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 0, 1, 1, 0.5, 1], dtype=torch.float64)
    w = torch.tensor([1, 1, 1, 1, 1, 1, 2, 1], dtype=torch.float64)
    theta = fit_logistic(x, y, w, l2=0.0)
    p = torch.sigmoid(x[:, 0] * theta[0] + theta[1])
    assert p[0].item() == pytest.approx(0.25, abs=1e-5)
    assert p[-1].item() == pytest.approx((1 + 1 + 2 * 0.5 + 1) / 5, abs=1e-5)
    assert abs(fit_logistic(x, y, w, l2=10.0)[0]) < abs(theta[0])


def test_score_and_verdict():
    samples = _FakeSamples([(0, "a", 1, 2), (1, "a", 1, 0), (1, "b", 0, 1), (2, "b", 0, 1), (0, "c", 2, 1), (1, "c", 0, 1)])
    preds = {"constant": [0.4] * 6, "hidden_task": [0.5, 0.9, 0.2, 0.1, 0.6, 0.3], CEILING: [0.5, 1.0, 0.0, 0.0, 0.7, 0.1]}
    table = score(preds, samples, n_boot=100, seed=0, reference="hidden_task")
    assert set(table) == {"all", "depth>=1", "depth=0", "depth=1", "depth=2"}
    assert table["all"]["constant"]["auroc"] == 0.5 and table["all"]["constant"]["auroc_ci"] == [0.5, 0.5]
    assert table["all"]["hidden_task"]["pairs"] == 10 and table["depth>=1"]["hidden_task"]["prefixes"] == 4
    assert table["depth>=1"]["hidden_task"]["auroc"] == 1.0
    lo, hi = table["all"]["hidden_task"]["auroc_ci"]
    assert lo <= table["all"]["hidden_task"]["auroc"] <= hi
    v = verdict(table)
    assert v["within_margin_of_ceiling"] is True and v["above_simple_baselines"]["constant"] is True
    assert v["above_simple_baselines"]["features"] is None  # not evaluated


class _FakeSamples(list):
    """Samples with just what `score` reads: (depth, prompt, successes, failures)."""

    def __init__(self, rows):
        class S:
            def __init__(self, depth, prompt, s, f):
                self.depth, self.cluster, self.successes, self.leaves = depth, (1, prompt), s, s + f
        super().__init__(S(*r) for r in rows)


def test_task_features_of_a_hand_built_tree():
    from tracerl.allocate.predictor import MAX_HOPS, TEMPLATE_BUCKETS, task_features, task_features_dim
    from tracerl.task import Task
    from tracerl.tree import RolloutTree, TurnRecord

    task = Task("q", "Where was the founder of Acme born?", ("Lyon",),
                {"hops": 2, "template": "founder>born_in", "chain": ["Acme", "Ann Lee"]})
    tree = RolloutTree(task, 0, 0, [1, 2], {})
    turn = lambda obs, **k: TurnRecord([5, 6, 7], [0.0] * 3, [8], {"observation": obs, **k}, {})  # noqa: E731
    leaf = tree.attach(0, [turn("Doc 1 (Acme): Acme was founded by Ann Lee.", tool_call=True),
                           turn("Invalid turn: close the tag.", format_error="unclosed_tag"),
                           turn("Doc 1 (Ann Lee): Ann Lee was born in Lyon.", tool_call=True)], done=False)
    T = 4
    rows = {n: task_features(tree, n, T) for n in (0, 1, 3)}
    assert all(len(r) == task_features_dim(T) for r in rows.values())
    tail = lambda r: r[-6:]  # noqa: E731  log tokens, gold seen, chain share seen, answer seen, format errors, searches
    assert tail(rows[0]) == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert tail(rows[1]) == pytest.approx([np.log1p(3), 0.0, 0.5, 0.0, 0.0, 1.0])
    assert tail(rows[leaf]) == pytest.approx([np.log1p(9), 1.0, 1.0, 1.0, 1.0, 2.0])
    depth_hot = lambda r: r[:T]  # noqa: E731
    assert depth_hot(rows[0]) == [1, 0, 0, 0] and depth_hot(rows[leaf]) == [0, 0, 0, 1]
    hops_hot = rows[1][T:T + MAX_HOPS + 1]
    assert hops_hot == [0, 0, 1, 0, 0]
    cross = rows[1][T + MAX_HOPS + 1:T + MAX_HOPS + 1 + T * MAX_HOPS]  # depth 1 × hops 2
    assert sum(cross) == 1 and cross[1 * MAX_HOPS + 1] == 1
    template = rows[1][-6 - TEMPLATE_BUCKETS:-6]
    assert sum(template) == 1 and template == rows[leaf][-6 - TEMPLATE_BUCKETS:-6]


def test_step_lists():
    assert parse_steps("2-3,5", [1, 2, 3, 4, 5], "--eval-steps") == [2, 3, 5]
    assert parse_steps("4-", [1, 2, 3, 4, 5], "x") == [4, 5]
    with pytest.raises(PredictorEvalError, match="step 9 has no logged trees"):
        parse_steps("9", [1, 2], "--eval-steps")
    with pytest.raises(PredictorEvalError, match="not a step list"):
        parse_steps("a-b", [1, 2], "--eval-steps")


# ---------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """4 logged steps of the tiny run, every checkpoint kept. The tiny policy never answers right, so the
    leaves are relabelled: a leaf succeeds iff its question has one hop (steps 1-2 and 3-4 both hold
    1- and 2-hop questions)."""
    from tracerl.train import train

    run = tmp_path_factory.mktemp("predeval") / "run"
    train(None, [*TINY_RUN, f"run.dir={run}", "trainer.tree_log_every=1", "trainer.checkpoint_every=1",
                 "trainer.keep_checkpoints=4", "trainer.eval_every=0", "trainer.eval_size=2", "run.threads=1"],
          log=lambda *_: None)
    hops = {}
    for f in sorted((run / "trees").glob("step_*.jsonl")):
        lines = [json.loads(line) for line in f.read_text().splitlines()]
        for t in lines:
            hops.setdefault(f.name, []).append(t["task"]["meta"]["hops"])
            for n in t["nodes"]:
                if n["done"]:
                    n["reward"] = float(t["task"]["meta"]["hops"] == 1)
        f.write_text("".join(json.dumps(t) + "\n" for t in lines))
    for half in (("step_000001.jsonl", "step_000002.jsonl"), ("step_000003.jsonl", "step_000004.jsonl")):
        assert {h for name in half for h in hops[name]} == {1, 2}  # the test needs both kinds in both halves
    return run


@pytest.mark.slow
def test_harness_end_to_end_on_a_logged_run(logged_run, capsys):
    from tracerl.cli import main
    from tracerl.tree import read_jsonl

    out = logged_run.parent / "result.json"
    assert main(["predictor-eval", str(logged_run), "--train-steps", "1-2", "--eval-steps", "3-4", "--mc", "2",
                 "--bootstrap", "50", "--out", str(out), "--markdown", "run.threads=1", "predictor.warmup=1"]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["generators_exact"] and r["train_steps"] == [1, 2] and r["eval_steps"] == [3, 4]
    # held-out prefixes: per prompt its root plus every non-leaf node with leaves, as counted from the files
    trees = [t for k in (3, 4) for t in read_jsonl(logged_run / "trees" / f"step_{k:06d}.jsonl")]
    for t in trees:
        t.update_stats()
    nodes = [n for t in trees for n in t.nodes.values() if n.id and not n.done and n.leaves]
    table = r["table"]
    assert table["all"]["constant"]["prefixes"] == len(trees) + len(nodes)  # one tree per prompt here
    assert table["all"]["constant"]["pairs"] == sum(t.root.leaves for t in trees) + sum(n.leaves for n in nodes)
    assert set(table["all"]) == {*PREDICTORS, CEILING}
    # hops decides the relabelled outcome: the feature model learns it on steps 1-2 and ranks steps 3-4 right
    assert table["all"]["features"]["auroc"] == pytest.approx(1.0)
    assert table["depth>=1"]["features"]["auroc"] == pytest.approx(1.0)
    assert table["all"]["constant"]["auroc"] == 0.5
    assert r["info"]["base_rate"] == pytest.approx(
        sum(n["reward"] for k in (1, 2) for line in (logged_run / "trees" / f"step_{k:06d}.jsonl").read_text().splitlines()
            for n in json.loads(line)["nodes"] if n["done"]) / sum(
            1 for k in (1, 2) for line in (logged_run / "trees" / f"step_{k:06d}.jsonl").read_text().splitlines()
            for n in json.loads(line)["nodes"] if n["done"]))
    for key in PREDICTORS:
        row = table["all"][key]
        assert 0.0 <= row["brier"] <= 1.0 and 0.0 <= row["ece"] <= 1.0, key
    assert r["info"]["hidden_warm"]
    assert "| (e'') (e) + task features, online (default: predictor.task_features=true) |" in printed
    assert "target at depth>=1: default (hidden_task) AUROC" in printed


def test_overlapping_steps_and_bad_predictor_are_one_line_errors(logged_run):
    with pytest.raises(PredictorEvalError, match="overlap"):
        evaluate_predictors(logged_run, None, EvalOptions(train_steps="1-3", eval_steps="3-4"))
    with pytest.raises(PredictorEvalError, match="unknown predictor 'oracle'"):
        evaluate_predictors(logged_run, None, EvalOptions(predictors=("oracle",)))
    with pytest.raises(PredictorEvalError, match="no logged trees"):
        evaluate_predictors(logged_run / "checkpoints" / "step_000001", None, EvalOptions())
