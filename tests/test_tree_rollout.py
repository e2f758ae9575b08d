"""Tree rollouts on a real (tiny) policy: KV-prefix reuse, exact continuation, allocators, cost."""

from __future__ import annotations

import random

import pytest
import torch

from tracerl.allocate import ALLOCATORS, AllocationContext, check_tree_shape, match_tree_shape
from tracerl.backends.hf import SamplingParams
from tracerl.config import ConfigError, RolloutConfig, load_config
from tracerl.errors import OptionError
from tracerl.methods import check_methods
from tracerl.rollout import RolloutEngine, encode_prompt, leaf_trajectories, restore
from tracerl.train import Trainer

GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)
SAMPLE = SamplingParams(max_new_tokens=16, temperature=1.0)


def _engine(policy, env, params=SAMPLE, seed=0, batch_size=64):
    return RolloutEngine(policy, env, params, torch.Generator().manual_seed(seed), batch_size=batch_size)


def test_shared_prefixes_are_prefilled_once_and_give_identical_greedy_tokens(tiny_policy, small_env):
    tok = tiny_policy.tokenizer
    a, b = (encode_prompt(tok, small_env, t) for t in small_env.tasks("train")[:2])
    prompts = [a, b, a, a, b, a]
    reused, stats = tiny_policy.generate(prompts, GREEDY, reuse_prefix=True)
    fresh, fresh_stats = tiny_policy.generate(prompts, GREEDY, reuse_prefix=False)
    assert stats.computed == len(a) + len(b) and stats.saved == 3 * len(a) + len(b)
    assert fresh_stats.saved == 0 and fresh_stats.computed == sum(map(len, prompts))
    for r, f in zip(reused, fresh):
        assert r.token_ids == f.token_ids
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(f.logprobs), atol=1e-5, rtol=0)


def test_branches_from_a_node_equal_recomputation_from_scratch(tiny_policy, small_env):
    """Greedy branches from intermediate nodes (batched with KV reuse across anchors) are
    token-identical to generating from each restored prefix alone."""
    tasks = small_env.tasks("train")[:3]
    eng = _engine(tiny_policy, small_env)
    trees = eng.plant(tasks, 1)
    eng.grow([(t, 0) for t in trees])  # sampled seed chains give intermediate nodes
    eng.params = GREEDY
    jobs = [(t, a) for t in trees for a in t.anchors() for _ in range(3)]
    assert any(a != 0 for _, a in jobs), "need at least one intermediate anchor"
    before = eng.cost.prefill_saved
    leaves = eng.grow(jobs, continuation=True)
    assert eng.cost.prefill_saved > before
    for (tree, anchor), leaf in zip(jobs, leaves):
        prefix, _, _ = tree.prefix(anchor)
        first = tree.path(leaf)[tree.nodes[anchor].depth + 1]
        (alone,), _ = tiny_policy.generate([prefix], GREEDY)
        assert first.gen_ids == alone.token_ids


def test_continuations_resume_the_exact_prefix_and_environment_state(tiny_policy, small_env):
    tasks = small_env.tasks("train")[:4]
    eng = _engine(tiny_policy, small_env, seed=1)
    trees = eng.plant(tasks, 2)
    eng.grow([(t, 0) for t in trees])
    jobs = [(t, a) for t in trees for a in t.anchors()]
    leaves = eng.grow(jobs, continuation=True)
    for (tree, anchor), leaf in zip(jobs, leaves):
        path = tree.path(leaf)
        assert tree.nodes[anchor] in path  # the new leaf hangs below its anchor
        assert tree.prefix(leaf)[0][: len(tree.prefix(anchor)[0])] == tree.prefix(anchor)[0]
        assert len(path) - 1 <= small_env.max_turns
        # replaying the leaf's turn texts from scratch reaches the same observations and reward:
        # the restored environment state was exact
        state = small_env.initial_state(tree.task)
        for node in path[1:]:
            state, res = small_env.step(state, node.turn["text"], truncated=node.turn["cut"])
            assert res.observation == node.turn["observation"] and state == node.state
        if tree.nodes[leaf].done and not tree.nodes[leaf].info.get("context_full"):
            assert res.done and res.reward == tree.nodes[leaf].reward
    for t in trees:
        t.update_stats()
    for traj in leaf_trajectories(trees):
        ids, mask, logp = traj.tree.prefix(traj.node)
        assert (traj.token_ids, traj.loss_mask, traj.logprobs) == (ids, mask, logp)
        assert traj.reward == traj.tree.nodes[traj.node].reward
    with pytest.raises(Exception, match="is a leaf"):
        eng.grow([(trees[0], trees[0].leaf_ids()[0])])
    anchor = trees[0].nodes[trees[0].anchors()[-1]]
    r = restore(trees[0], anchor.id)
    assert r.state == anchor.state and r.state is not anchor.state  # a continuation cannot alter the node


def test_cost_counters_match_the_trees(tiny_policy, small_env):
    cfg = RolloutConfig(allocator="tree_grpo", trees_per_prompt=2, expansions=3, rounds=2)
    tasks = small_env.tasks("train")[:3]
    eng = _engine(tiny_policy, small_env, seed=2)
    trees = ALLOCATORS.get("tree_grpo")(AllocationContext(eng, cfg, random.Random(0)), tasks)
    c = eng.cost
    nodes = [n for t in trees for n in t.nodes.values()]
    assert len(trees) == 6 and all(len(t.leaf_ids()) == 1 + 3 * 2 for t in trees)  # K = None keeps all
    assert c.trajectories == 6 * 7 and c.continuations == 6 * 6
    assert c.gen_tokens == sum(len(n.gen_ids) for n in nodes)
    assert c.tool_calls == sum(bool(n.turn.get("tool_call")) for n in nodes)
    assert 0 < c.continuation_fraction <= 1.5 and c.prefill_saved > 0


def test_uniform_allocator_is_g_chains_and_k_prunes_trees(tiny_policy, small_env):
    tasks = small_env.tasks("train")[:2]
    trees = ALLOCATORS.get("uniform")(AllocationContext(_engine(tiny_policy, small_env), RolloutConfig(group_size=5),
                                                        random.Random(0)), tasks)
    assert len(trees) == 2 and all(len(t.root.children) == 5 and len(t.leaf_ids()) == 5 for t in trees)
    cfg = RolloutConfig(allocator="tree_grpo", trees_per_prompt=3, expansions=2, rounds=2, leaves_per_tree=2)
    eng = _engine(tiny_policy, small_env)
    trees = ALLOCATORS.get("tree_grpo")(AllocationContext(eng, cfg, random.Random(0)), tasks)
    assert len(trees) == 6 and all(len(t.leaf_ids()) == 2 for t in trees)
    assert eng.cost.trajectories == 6 * 5  # pruned leaves are still charged


def test_token_budget_is_spent_within_one_trajectory(tiny_policy, small_env):
    tasks = small_env.tasks("train")[:3]
    for cfg in (RolloutConfig(group_size=2, token_budget=150),
                RolloutConfig(allocator="tree_grpo", trees_per_prompt=1, expansions=1, rounds=1, token_budget=150)):
        ctx = AllocationContext(_engine(tiny_policy, small_env), cfg, random.Random(0))
        trees = ALLOCATORS.get(cfg.allocator)(ctx, tasks)
        spent = sum(len(n.gen_ids) for t in trees for n in t.nodes.values())
        assert spent == ctx.engine.cost.gen_tokens and 450 <= spent <= 450 + ctx.metrics["budget_last_wave_max"]
        if cfg.allocator == "uniform":  # chains in rounds: every prompt within one chain of the others
            counts = [len(t.root.children) for t in trees]
            assert max(counts) - min(counts) <= 1 and min(counts) >= 2, counts


def test_tree_shape_validation_and_matching(tmp_path):
    with pytest.raises(ConfigError, match=r"leaves_per_tree \(K\) = 4 exceeds 1 \+ N·L = 3"):
        load_config(None, ["rollout.allocator=tree_grpo", "rollout.expansions=2", "rollout.rounds=1",
                           "rollout.leaves_per_tree=4"])
    # which estimators need trees is a registry trait, checked by check_methods (Trainer.setup's first step)
    cfg = load_config(None, ["algo.advantage=tree_grpo", f"run.dir={tmp_path / 'run'}"])  # chains (rollout.allocator=uniform)
    with pytest.raises(ConfigError, match="algo.advantage=tree_grpo needs tree rollouts; set rollout.allocator to one of"):
        check_methods(cfg)
    with pytest.raises(ConfigError, match="needs tree rollouts"):
        Trainer(cfg, log=lambda *_: None).setup()
    assert not (tmp_path / "run").exists()  # refused before anything is built
    check_methods(load_config(None, ["algo.advantage=tree_grpo", "rollout.allocator=tree_grpo"]))
    with pytest.raises(OptionError, match="between 1 and"):
        check_tree_shape(2, 2, 1, 0)
    load_config(None, ["rollout.allocator=tree_grpo", "algo.advantage=treepo", "rollout.leaves_per_tree=3"])
    shape = match_tree_shape(8, 0.5)
    assert abs(shape["expected_cost_chains"] - 8) < 0.5
    m, n, l = shape["trees_per_prompt"], shape["expansions"], shape["rounds"]
    assert shape["expected_cost_chains"] == pytest.approx(m * (1 + n * l * 0.5))
    with pytest.raises(OptionError):
        match_tree_shape(8, 0.0)


def test_calibrate_cli_measures_f_and_prints_equal_cost_overrides(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import TINY_RUN

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    p = subprocess.run([sys.executable, "-m", "tracerl.cli", "calibrate", "--steps", "1", "--json", *TINY_RUN],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["mean_chain_tokens"] > 0 and 0 < res["continuation_fraction"] < 2
    assert res["token_budget"] == round(res["group_size"] * res["mean_chain_tokens"])
    assert "overrides: rollout.allocator=tree_grpo" in p.stdout
