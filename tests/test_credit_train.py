"""FlowTracer in the trainer: weights multiply the advantages in both layouts (rows, packed trees), a real step
logs its credit metrics and samples, and the report shows them (escaped)."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from conftest import TINY_RUN, with_random_advantages as _with_adv
from tracerl.config import load_config
from tracerl.report.credit import credit_section
from tracerl.report.html import write_report
from tracerl.packing import build_batch
from tracerl.rollout import RolloutCost, encode_prompt, replay_turns, turn_records
from tracerl.train import Trainer
from tracerl.tree import RolloutTree


def oracle_trees(env, tok, tasks) -> list[RolloutTree]:
    """One tree per task without sampling: the oracle chain (reward 1), a branch that shares all
    its turns but the last and answers wrongly (reward 0), and a one-turn guess from the root."""
    trees = []
    for g, task in enumerate(tasks):
        tree = RolloutTree(task, g, 0, encode_prompt(tok, env, task), env.initial_state(task))
        good = env.oracle_turns(task, random.Random(g))
        variants = ((good, 0), (good[:-1] + ["<think>Not sure.</think>\n<answer>nobody</answer>"], len(good) - 1),
                    (["<think>Guess.</think>\n<answer>1999</answer>"], 0))
        first_leaf = None
        for turns, start in variants:
            traj = replay_turns(tok, env, task, turns)
            anchor = 0 if start == 0 else tree.path(first_leaf)[start].id
            leaf = tree.attach(anchor, turn_records(traj, start), True, traj.reward, traj.info)
            first_leaf = first_leaf or leaf
        tree.update_stats()
        trees.append(tree)
    return trees


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    cfg = load_config(None, [*TINY_RUN, "credit.name=flowtracer", "trainer.tree_log_every=1",
                             f"run.dir={tmp_path_factory.mktemp('credit') / 'run'}"])
    tr = Trainer(cfg, log=lambda *_: None)
    tr.setup()
    return tr


def _expected_loss(leaves, adv, weights):
    """PG loss at ratio 1 (a fresh batch): −Σ_i A_i Σ_{sampled t} w_i(t) / Σ sampled tokens."""
    num = sum(a * float(w[torch.tensor(t.loss_mask, dtype=torch.bool)].sum())
              for t, a, w in zip(leaves, adv.tolist(), weights))
    return -num / sum(sum(t.loss_mask) for t in leaves)


def test_weights_multiply_the_advantages_in_both_layouts(trainer):
    trees = oracle_trees(trainer.env, trainer.tokenizer, trainer.train_tasks[:3])
    with_adv = _with_adv(trees, seed=0)
    ref = build_batch(with_adv, "rows")
    leaves, adv = ref.leaves, ref.adv
    assert len(leaves) == 9 and sum(t.reward for t in leaves) == 3
    assert any(n.parent is not None and n.leaves > 1 for t in trees for n in t.nodes.values())  # shared prefixes
    separate = trainer.credit(leaves, adv, step=0)  # a separate early-stopped attention pass
    assert separate is not None and any(torch.any(w != 1) for w in separate.weights)
    state = copy.deepcopy(trainer.model.state_dict())
    losses, steps = {}, {}
    for name, layout, with_credit in (("rows", "rows", False), ("rows_w", "rows", True), ("packed_w", "trees", True)):
        trainer.model.load_state_dict(state)
        batch = build_batch(with_adv, layout)
        assert [(lf.tree, lf.node) for lf in batch.leaves] == [(lf.tree, lf.node) for lf in leaves]
        assert torch.equal(batch.adv, adv)
        steps[name] = trainer.credit.start(batch.leaves, batch.adv, step=0) if with_credit else None
        losses[name] = trainer.update(batch, 0, steps[name])["loss"]
        if with_credit:  # the batch's coefficients are A · w on each leaf's sampled tokens
            w = steps[name].result().weights
            for i, lf in enumerate(batch.leaves):
                n = int(batch.mask[i].sum())
                torch.testing.assert_close(batch.coef[i, :n], batch.adv[i] * w[i][batch.sampled_pos[i]])
        else:
            assert batch.weights is None and torch.equal(batch.coef, batch.adv[:, None] * batch.mask)
    trainer.model.load_state_dict(state)
    tapped = steps["rows_w"].result().weights  # read from the update's own (micro-batched, train-mode) forward
    assert len(tapped) == len(separate.weights) == 9
    for w_tap, w_sep in zip(tapped, separate.weights):
        assert torch.equal(w_tap, w_sep)
    ones = [torch.ones(len(t.token_ids)) for t in leaves]
    assert losses["rows"] == pytest.approx(_expected_loss(leaves, adv, ones), abs=1e-5)
    assert losses["rows_w"] == pytest.approx(_expected_loss(leaves, adv, tapped), abs=1e-5)
    assert losses["packed_w"] == pytest.approx(losses["rows_w"], abs=1e-5)
    # the packed update read each leaf's map from its packed forward (tree mask, path positions): the
    # same maps as the leaf's own row up to float rounding, hence the same weights
    packed = steps["packed_w"].result().weights
    same = sum(int((wp == wt).sum()) for wp, wt in zip(packed, tapped))
    assert same == sum(len(w) for w in tapped)
    assert abs(losses["rows_w"] - losses["rows"]) > 1e-4  # the weights really changed the objective


@pytest.mark.parametrize("layout", ["rows", "trees"])
def test_old_logprob_pass_supplies_the_weights_when_there_is_one(trainer, monkeypatch, layout):
    """With several mini-batches the weights must come from π_old: the no-grad log-prob pass that
    precedes every optimizer step, not a later training forward."""
    with_adv = _with_adv(oracle_trees(trainer.env, trainer.tokenizer, trainer.train_tasks[:2]), seed=2)
    ref = build_batch(with_adv, layout)
    state = copy.deepcopy(trainer.model.state_dict())
    want = trainer.credit(ref.leaves, ref.adv, step=0).weights
    monkeypatch.setattr(trainer.cfg.trainer, "mini_batches", 2)
    monkeypatch.setattr(trainer.cfg.trainer, "lr", 0.5)  # the first mini-batch's step changes the policy a lot
    trainer.model.load_state_dict(state)
    batch = build_batch(with_adv, layout)
    assert len(batch.mini_batches(2)) == 2 and all(batch.mini_batches(2))
    cs = trainer.credit.start(batch.leaves, batch.adv, step=0)
    trainer.update(batch, 0, cs)
    assert any(not torch.equal(a, b) for a, b in zip(state.values(), trainer.model.state_dict().values()))
    got = cs.result().weights
    assert len(got) == len(want) == 6 and any(torch.any(w != 1) for w in want)
    for w_tap, w_sep in zip(got, want):
        assert torch.equal(w_tap, w_sep)
    trainer.model.load_state_dict(state)


def test_train_step_logs_credit_and_the_report_shows_it(trainer, monkeypatch):
    # the step's rollout is replaced by oracle trees (sampling is tested elsewhere and is slow here)
    trees = oracle_trees(trainer.env, trainer.tokenizer, trainer.train_tasks[3:6])
    monkeypatch.setattr(trainer, "rollout", lambda step: (trees, RolloutCost(gen_tokens=1, trajectories=9)))
    trainer.alloc_info = {}
    metrics = trainer.train_step(0)
    assert metrics["trained_trajectories"] == 9 and metrics["credit_rows"] == 9  # GRPO: every group is mixed
    assert metrics["credit_s"] > 0 and 0.3 < metrics["credit_hub_frac"] <= 0.41
    assert metrics["credit_weight_mean"] == pytest.approx(1 + 0.5 * metrics["credit_hub_frac"])
    path = trainer.run_dir / "credit" / "step_000001.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert 1 <= len(rows) <= 4 and all(len(r["tokens"]) == len(r["weight"]) for r in rows)
    page = write_report(trainer.run_dir).read_text()
    assert "Token credit (FlowTracer)" in page and page.count('class="credit-row"') == len(rows)
    assert page.count("t hub") + page.count("ans hub") >= 1


def test_credit_view_escapes_model_output(tmp_path):
    rec = {"task_id": "t<1>", "question": "<script>alert(1)</script>", "gold": "&", "reward": 1.0,
           "advantage": 0.5, "answer_found": False, "tokens": ["<u>", "x", "\x07y", "</answer>"],
           "kind": ["g", "g", "o", "a"], "score": [0.2, 0.4, 0.0, 0.9], "weight": [1.5, 1.0, 1.0, 1.0]}
    path = tmp_path / "step_000003.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    html = credit_section({3: path})
    assert "<script>" not in html and "<u>" not in html and "\x07" not in html
    assert "&lt;script&gt;" in html and "&lt;u&gt;" in html
    assert 'class="t hub"' in html and 'class="t obs"' in html and 'class="t ans"' in html
    # shade relative to the largest sampled token outside the answer; the answer saturates
    assert "rgba(255, 127, 14, 0.500)" in html and html.count("rgba(255, 127, 14, 1.000)") == 2
    assert credit_section({}) == ""
