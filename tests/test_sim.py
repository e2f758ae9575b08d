"""The rollout-free simulator: the simulated engine and predictor behind the shipped allocators (the
engine interface they share with real rollouts, what the engine charges, the predictor's noise model),
the world's semantics, equal budgets, a known ordering, determinism and the `tracerl sim` command."""

from __future__ import annotations

import inspect
import itertools
import json
import math
import random
import statistics

import pytest

from tracerl.allocate import ALLOCATORS
from tracerl.allocate.engine import NodeRef, TreeEngine, ValuePredictor
from tracerl.cli import build_parser, main
from tracerl.config import ConfigError
from tracerl.errors import OptionError, TracerlError
from tracerl.sim import (SimConfig, SimEngine, SimFeatures, SimPredictor, World, allocator_names, batch_metrics,
                         build_config, default_token_budget, run_batch, simulate)
from tracerl.sim.run import prompt_contrast
from tracerl.sim.world import PromptStream
from tracerl.tree import TreeError

SMALL = ["rollout.prompts_per_step=8", "rollout.group_size=4"]
WORLDS = {"default": SimConfig(), "one-turn": SimConfig(turns=1), "early-stop": SimConfig(early_stop=0.4, turns=4),
          "all-fail": SimConfig(difficulty="point:0.0"), "s=1-oracle": SimConfig(turn_strength=1.0, oracle=True)}


def _engine(cfg: SimConfig = SimConfig(), seed: int = 0) -> tuple[SimEngine, PromptStream]:
    return SimEngine(World(cfg, random.Random(seed))), PromptStream(cfg, 8, seed, 0)


def _node_tokens(trees) -> int:
    return sum(len(n.gen_ids) for t in trees for n in t.nodes.values())


# ---------------------------------------------------------------------------------- the interface


def test_both_engines_implement_the_interface_allocators_use():
    from tracerl.allocate.predictor import SuccessPredictor
    from tracerl.rollout import RolloutEngine

    checked = []
    for proto, impls in ((TreeEngine, (RolloutEngine, SimEngine)), (ValuePredictor, (SuccessPredictor, SimPredictor))):
        for name, member in vars(proto).items():
            if name.startswith("_"):
                continue
            for impl in impls:
                got = getattr(impl, name)
                if callable(member):  # the same parameters, names and defaults
                    want = [(k, p.default) for k, p in inspect.signature(member).parameters.items()]
                    assert [(k, p.default) for k, p in inspect.signature(got).parameters.items()] == want, (impl, name)
                else:
                    assert isinstance(got, property), (impl, name)
            checked.append(name)
    assert checked == ["plant", "more_trees", "root_hidden", "grow", "warm", "predict"]
    assert isinstance(_engine()[0], TreeEngine) and isinstance(SimPredictor(0.5), ValuePredictor)


def test_simulator_runs_every_registered_allocator_in_table_order():
    assert sorted(allocator_names()) == ALLOCATORS.names()
    assert allocator_names()[:6] == ["uniform", "tree_grpo", "dapo", "pcl", "knapsack", "trace"]


# ---------------------------------------------------------------------------------- the engine


def test_sim_engine_charges_exactly_what_it_generates():
    cfg = SimConfig(turns=4, turn_tokens="10-30")
    eng, prompts = _engine(cfg)
    trees = eng.plant(prompts.batch(2), [2, 1])
    assert [(t.group, t.index) for t in trees] == [(0, 0), (0, 1), (1, 0)] and eng.trees == trees
    assert eng.cost.gen_tokens == 0 and all(not t.hidden for t in trees)
    leaves = eng.grow([(t, 0) for t in trees] + [(trees[0], 0)])
    c = eng.cost
    assert c.trajectories == 4 and c.continuations == 0 and c.continuation_gen_tokens == 0
    assert c.gen_tokens == _node_tokens(trees) and c.tool_calls == 4 * 3  # every turn but the last calls a tool
    assert c.prefill_tokens == c.prefill_saved == 0
    assert all(trees[0].nodes[leaf].depth == 4 for leaf in leaves[::3])
    # features wherever a generation can start (the root and every non-leaf node), never on a leaf
    for t in trees:
        assert set(t.hidden) == set(t.anchors()) and t.hidden[0] == SimFeatures(t.task.meta["v0"], t.task.meta["z"])
        assert all(t.hidden[i].value == t.nodes[i].state["v"] for i in t.hidden)
    # a continuation pays only the turns below its prefix and counts as one
    before, mid = c.gen_tokens, trees[1].path(leaves[1])[2]  # depth 2: two turns to go
    (leaf,) = eng.grow([(trees[1], mid.id)], continuation=True)
    new = trees[1].path(leaf)[3:]
    assert len(new) == 2 and c.gen_tokens - before == sum(len(n.gen_ids) for n in new) == c.continuation_gen_tokens
    assert c.trajectories == 5 and c.continuations == 1 and c.tool_calls == 12 + 1
    assert c.continuation_fraction == pytest.approx((c.gen_tokens - before) / (before / 4))  # 1 continuation, 4 chains
    with pytest.raises(TreeError):
        eng.grow([(trees[1], leaf)])


def test_more_trees_share_the_root_and_root_features_are_free():
    eng, prompts = _engine()
    (a,) = eng.plant(prompts.batch(1), 1)
    eng.root_hidden([a])
    assert 0 in a.hidden and eng.cost.gen_tokens == 0
    more = eng.more_trees(a, 2, 1)
    assert [t.index for t in more] == [1, 2] and all(t.group == a.group and t.hidden[0] is a.hidden[0] for t in more)
    assert eng.trees == [a, *more] and all(t.root.state == a.root.state and t.root.state is not a.root.state for t in more)


def test_the_predictor_adds_logit_noise_once_per_node():
    eng, prompts = _engine()
    trees = eng.plant(prompts.batch(3), 1)
    eng.grow([(t, 0) for t in trees])
    refs = [NodeRef(t, i) for t in trees for i in t.hidden]
    oracle, exact, noisy = SimPredictor(0.7, oracle=True), SimPredictor(0.0), SimPredictor(0.7)
    assert oracle.warm and oracle.predict(refs) == [r.tree.hidden[r.node].value for r in refs]
    assert exact.predict(refs) == pytest.approx(oracle.predict(refs))
    for r, p in zip(refs, noisy.predict(refs)):
        f = r.tree.hidden[r.node]
        assert math.log(p / (1 - p)) == pytest.approx(math.log(f.value / (1 - f.value)) + 0.7 * f.z)
    assert noisy.predict(refs) == noisy.predict(refs)  # a node always gets the same prediction
    assert not SimPredictor(0.5, warm=False).warm
    with pytest.raises(TracerlError, match="no features"):
        noisy.predict([NodeRef(trees[0], trees[0].leaf_ids()[0])])


def test_turns_are_a_martingale_with_the_stated_variance():
    s, v0, n = 0.3, 0.3, 4000
    world = World(SimConfig(turn_strength=s, turns=3), random.Random(0))
    runs = [world.trajectory(v0, 0) for _ in range(n)]
    rewards, finals, first = [r[-1].reward for r in runs], [r[-1].value for r in runs], [r[0].value for r in runs]
    se = (v0 * (1 - v0) / n) ** 0.5
    assert abs(statistics.fmean(rewards) - v0) < 4 * se and abs(statistics.fmean(finals) - v0) < 4 * se
    assert statistics.pvariance(first) == pytest.approx(s * v0 * (1 - v0), rel=0.1)
    assert all(0.0 <= v <= 1.0 for v in finals) and all(len(r) == 3 for r in runs)
    with pytest.raises(ValueError):
        world.trajectory(0.5, 3)


def test_expected_contrast_is_the_mean_of_realised_contrast_over_leaf_outcomes():
    eng, prompts = _engine(SimConfig(turns=3), seed=4)
    a, b = eng.plant(prompts.batch(1), 2)  # two trees of one prompt: the root pools both
    eng.grow([(a, 0), (a, 0), (b, 0)])
    mid = [i for i in a.anchors() if i]
    eng.grow([(a, mid[0]), (b, 1)], continuation=True)
    leaves = [(t, i) for t in (a, b) for i in t.leaf_ids()]
    expected = prompt_contrast([a, b])[3]
    mean = 0.0
    for outcome in itertools.product((0.0, 1.0), repeat=len(leaves)):
        prob = 1.0
        for (t, leaf), r in zip(leaves, outcome):
            t.nodes[leaf].reward = r
            v = t.nodes[leaf].state["v"]
            prob *= v if r else 1 - v
        mean += prob * prompt_contrast([a, b])[2]
    assert expected == pytest.approx(mean, abs=1e-12)


# ---------------------------------------------------------------------------------- the shipped allocators


@pytest.mark.parametrize("world", WORLDS, ids=str)
@pytest.mark.parametrize("name", ALLOCATORS.names())
def test_every_shipped_allocator_runs_and_is_charged_for_every_tree_it_grows(name, world):
    sim = WORLDS[world]
    for overrides, seed in itertools.product((SMALL, SMALL + ["rollout.token_budget=null", "alloc.root_solver=greedy"]),
                                             range(2)):
        b = run_batch(sim, build_config(sim, overrides, name), seed, 0)
        eng, c = b.engine, b.engine.cost
        assert b.trees and all(any(t is u for u in eng.trees) for t in b.trees)
        assert c.gen_tokens == _node_tokens(eng.trees) > 0  # nothing pruned (K unset), discarded work included
        assert c.trajectories == sum(len(t.leaf_ids()) for t in eng.trees)
        assert c.continuation_gen_tokens <= c.gen_tokens and c.continuations <= c.trajectories
        m = batch_metrics(b)
        assert m["leaves"] == sum(len(t.leaf_ids()) for t in b.trees) <= m["leaves_generated"] == c.trajectories
        assert 0 <= m["effective_ratio"] <= 1 and m["tokens"] == c.gen_tokens
        if name in ("uniform", "tree_grpo", "knapsack"):
            assert b.metrics["pool_size"] == 8  # the batch only
        if name in ("pcl", "trace"):
            assert b.metrics["pool_size"] == 32  # the simulator's pool of 4B
        if name == "trace":
            M = 8 * 4 // 2
            restarts, left = b.metrics["stage2_restarts"], b.metrics["stage2_leftover"]
            bare = c.trajectories - c.continuations
            assert bare == M + restarts + left + b.metrics["budget_chains"]
            assert b.metrics["stage1_rollouts"] == M  # B·G / (1 + N·f), f the prior (a fresh running estimate)


def test_every_allocator_is_given_the_same_budget_and_spends_it():
    """One step budget for all (rollout.token_budget × B = G chains per prompt in expectation). How far
    past it each one goes is its own rule (shipped code, measured here over 3 seeds × 2 batches of
    B = 64): uniform adds ≥ 1 chain to every prompt still under its share, Tree-GRPO N continuations to
    every tree under its share, TRACE and the others top the step up in waves of the measured mean chain
    length, DAPO starts another round of groups of G if the first left the budget unspent."""
    sim = SimConfig()
    limits = {"uniform": 1.10, "tree_grpo": 1.25, "dapo": 2.0, "pcl": 1.05, "knapsack": 1.05, "trace": 1.15}
    for name in allocator_names():
        cfg = build_config(sim, [], name)
        assert cfg.rollout.token_budget == default_token_budget(sim, 8) == 960
        for seed, batch in itertools.product(range(3), range(2)):
            b = run_batch(sim, cfg, seed, batch)
            assert b.budget == 61_440
            spent = b.engine.cost.gen_tokens
            assert spent >= b.budget or (name == "dapo" and b.metrics["dapo_groups_kept"] == 64), (name, spent)
            assert spent <= limits.get(name, 1.25) * b.budget, (name, spent)
    unbudgeted = run_batch(sim, build_config(sim, SMALL + ["rollout.token_budget=null"], "uniform"), 0, 0)
    assert unbudgeted.budget is None and unbudgeted.engine.cost.trajectories == 8 * 4  # exactly G chains each


def test_with_an_informative_predictor_trace_and_pcl_find_more_mixed_prompts_than_uniform():
    # measured over seeds 0..3 (3 batches, B = 16): uniform 0.52–0.71, pcl 0.92–1.0, trace 0.91–0.97; σ = 50: 0.62
    res = simulate(SimConfig(oracle=True), ["rollout.prompts_per_step=16"], ["uniform", "pcl", "trace"],
                   seed=0, seeds=4, batches=3)["allocators"]
    eff = {k: v["effective_ratio"] for k, v in res.items()}
    assert eff["trace"] >= eff["uniform"] + 0.15 and eff["pcl"] >= eff["uniform"] + 0.15, eff
    assert res["trace"]["mixed_anchors"] > 3 * res["uniform"]["mixed_anchors"]
    # an uninformative predictor takes most of it away
    blind = simulate(SimConfig(predictor_noise=50.0), ["rollout.prompts_per_step=16"], ["trace"], seeds=4,
                     batches=3)["allocators"]["trace"]["effective_ratio"]
    assert blind < eff["trace"] - 0.1


def test_every_allocator_sees_the_same_prompts():
    sim = SimConfig()
    batch = PromptStream(sim, 4, 2, 0).batch(8)
    for name in ("uniform", "tree_grpo", "pcl"):
        trees = run_batch(sim, build_config(sim, SMALL, name), 2, 0).engine.trees
        assert [t.task for t in trees if t.index == 0][:8] == batch, name  # PCL: the batch first, then its pool


def test_fixed_seed_is_deterministic():
    a = simulate(SimConfig(), SMALL, "all", seed=3, batches=2)
    assert a == simulate(SimConfig(), SMALL, "all", seed=3, batches=2)
    assert a["allocators"] != simulate(SimConfig(), SMALL, "all", seed=4, batches=2)["allocators"]


# ---------------------------------------------------------------------------------- options


def test_options_are_the_training_configs():
    sim = SimConfig(turns=5, turn_tokens="10")
    cfg = build_config(sim, ["alloc.epsilon=0", "rollout.group_size=4", "alloc.cap_root=8"], "trace")
    assert (cfg.rollout.allocator, cfg.rollout.prompts_per_step, cfg.alloc.pool_factor) == ("trace", 64, 4.0)
    assert (cfg.alloc.epsilon, cfg.alloc.cap_root, cfg.rollout.token_budget) == (0.0, 8, 4 * 50)
    assert build_config(sim, ["rollout.token_budget=100"]).rollout.token_budget == 100
    with pytest.raises(ConfigError, match="unknown config key 'alloc.explore'"):
        build_config(sim, ["alloc.explore=0.1"])
    with pytest.raises(ConfigError, match="cannot be split over a pool"):  # the training config's own checks
        build_config(sim, ["rollout.prompts_per_step=2", "alloc.pool_factor=1", "alloc.cap_root=2"], "trace")
    for bad in (["trainer.lr=1"], ["rollout.allocator=trace"]):
        with pytest.raises(OptionError, match="rollout.\\* and alloc.\\* overrides only"):
            build_config(sim, bad)
    with pytest.raises(OptionError, match="valid:"):
        build_config(sim, [], "nope")
    for bad in (dict(difficulty="beta:0,1"), dict(turn_tokens="60-20"), dict(turn_strength=1.5)):
        with pytest.raises(OptionError):
            SimConfig(**bad)


def test_cli_defaults_match_simconfig():
    args = build_parser().parse_args(["sim"])
    default = SimConfig()
    for key, value in vars(args).items():
        if hasattr(default, key):
            assert getattr(default, key) == value, key
    assert args.overrides == []


def test_cli_json_parses_and_takes_overrides(capsys):
    code = main(["sim", "--allocator", "all", "--batches", "2", "--seeds", "2", "--oracle", "--difficulty", "beta:2,5",
                 "--json", "rollout.prompts_per_step=6", "alloc.epsilon=0"])
    assert code == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(res["allocators"]) == allocator_names() and res["sim"]["oracle"] is True
    assert res["rollout"]["prompts_per_step"] == 6 and res["alloc"]["epsilon"] == 0 and res["budget"] == 6 * 960
    for row in res["allocators"].values():
        for key in ("effective_ratio", "mixed_anchors", "expected_contrast", "realised_contrast", "leaves", "tokens"):
            assert key in row
    assert main(["sim", "--allocator", "nope"]) == 2 and "valid:" in capsys.readouterr().err
    assert main(["sim", "alloc.explore=1"]) == 2 and "unknown config key 'alloc.explore'" in capsys.readouterr().err
