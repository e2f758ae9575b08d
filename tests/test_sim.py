"""The rollout-free simulator: world semantics, one budget rule and one charge for every allocator,
determinism, TRACE vs uniform with an oracle predictor, and the `tracerl sim` command."""

from __future__ import annotations

import itertools
import json
import random
import statistics

import pytest

from tracerl.cli import build_parser, main
from tracerl.errors import OptionError
from tracerl.sim import ORDER, SIM_ALLOCATORS, SimConfig, SimTree, World, batch_metrics, run_batch, simulate
from tracerl.sim.run import tree_contrast
from tracerl.sim.world import PromptStream, SimPrompt

SMALL = dict(prompts=8, group_size=4)
CONFIGS = [SimConfig(**SMALL), SimConfig(**SMALL, turns=1), SimConfig(**SMALL, early_stop=0.4, turns=4),
           SimConfig(**SMALL, budget=300), SimConfig(**SMALL, budget=5000, oracle=True, turn_strength=1.0),
           SimConfig(**SMALL, difficulty="point:0.0", root_solver="greedy")]


def test_registry_holds_every_allocator_in_table_order():
    assert sorted(ORDER) == SIM_ALLOCATORS.names()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"T{c.turns}-b{c.budget}-e{c.early_stop}-{c.difficulty}")
def test_every_allocator_spends_its_budget_under_one_overshoot_rule(cfg):
    longest = cfg.turns * cfg.turn_range[1]
    for name, batch in itertools.product(ORDER, range(2)):
        trees, budget = run_batch(cfg, name, seed=0, batch=batch)
        assert budget.jobs > 0
        # a trajectory starts only below the limit, then runs to its end
        assert budget.spent - budget.last_cost < budget.limit
        assert budget.spent <= budget.limit + longest
        if name != "dapo":  # DAPO may stop early once it has B mixed groups
            assert budget.spent >= budget.limit, name


@pytest.mark.parametrize("name", ORDER)
def test_allocators_charge_exactly_the_nodes_they_create(name):
    """A tree's cost is the tokens of its nodes, whoever grew it: no prefix is charged twice."""
    cfg = SimConfig(**SMALL, early_stop=0.2)
    trees, budget = run_batch(cfg, name, seed=1, batch=0)
    assert budget.spent == sum(t.total_tokens() for t in trees)
    for t in trees:
        on_paths = {n for leaf in t.leaves() for n in t.path(leaf)}
        assert on_paths == set(range(len(t)))  # no pruning: every node lies on a leaf's path
        assert all(t.tokens[n] >= cfg.turn_range[0] for n in range(1, len(t))) and t.tokens[0] == 0


def test_continuation_pays_only_its_new_turns():
    cfg = SimConfig(turns=4, turn_tokens="10-30")
    world = World(cfg, random.Random(0))
    tree = SimTree(SimPrompt(0, 0.5, 0.5, 0.5))
    leaf, cost = world.continue_from(tree, 0, branch=0)
    assert tree.depth[leaf] == 4 and cost == tree.total_tokens()
    before = tree.total_tokens()
    leaf2, cost2 = world.continue_from(tree, 2, branch=0)
    assert tree.depth[leaf2] == 4 and len(tree) == 7 and cost2 == tree.total_tokens() - before
    with pytest.raises(ValueError):
        world.continue_from(tree, leaf, branch=0)


def test_turns_are_a_martingale_with_the_stated_variance():
    s, v0, n = 0.3, 0.3, 4000
    world = World(SimConfig(turn_strength=s, turns=3), random.Random(0))
    rewards, finals, first = [], [], []
    for _ in range(n):
        tree = SimTree(SimPrompt(0, v0, v0, v0))
        leaf, _ = world.continue_from(tree, 0, branch=0)
        rewards.append(tree.reward[leaf])
        finals.append(tree.value[leaf])
        first.append(tree.value[1])
    se = (v0 * (1 - v0) / n) ** 0.5
    assert abs(statistics.fmean(rewards) - v0) < 4 * se and abs(statistics.fmean(finals) - v0) < 4 * se
    assert statistics.pvariance(first) == pytest.approx(s * v0 * (1 - v0), rel=0.1)
    assert all(0.0 <= v <= 1.0 for v in finals)


def test_expected_contrast_is_the_mean_of_realised_contrast_over_leaf_outcomes():
    world = World(SimConfig(turns=3), random.Random(4))
    tree = SimTree(SimPrompt(0, 0.4, 0.4, 0.4))
    for anchor in (0, 0, 1, 2):
        world.continue_from(tree, anchor, branch=0)
    leaves = tree.leaves()
    expected = tree_contrast(tree)[3]
    mean = 0.0
    for outcome in itertools.product((0, 1), repeat=len(leaves)):
        prob = 1.0
        for leaf, r in zip(leaves, outcome):
            tree.reward[leaf] = r
            prob *= tree.value[leaf] if r else 1 - tree.value[leaf]
        mean += prob * tree_contrast(tree)[2]
    assert expected == pytest.approx(mean, abs=1e-12)


def test_every_allocator_sees_the_same_prompts():
    cfg = SimConfig(**SMALL)
    firsts = {name: sorted(t.prompt.v0 for t in run_batch(cfg, name, 2, 0)[0]) for name in ("uniform", "tree_grpo")}
    assert firsts["uniform"] == firsts["tree_grpo"] == sorted(p.v0 for p in PromptStream(cfg, 2, 0).take(0, 8))


def test_fixed_seed_is_deterministic():
    cfg = SimConfig(**SMALL)
    a = simulate(cfg, "all", seed=3, batches=2)
    assert a == simulate(cfg, "all", seed=3, batches=2)
    assert a["allocators"] != simulate(cfg, "all", seed=4, batches=2)["allocators"]


def test_oracle_trace_has_a_higher_effective_ratio_than_uniform_on_mixed_difficulty():
    # measured over seeds 0..5 (3 batches, B = 16): uniform 0.50–0.69, trace 0.88–0.96; mean gap ≈ 0.34
    cfg = SimConfig(prompts=16, oracle=True, difficulty="beta:0.5,0.5")
    res = simulate(cfg, ["uniform", "trace"], seed=0, seeds=4, batches=3)["allocators"]
    assert res["trace"]["effective_ratio"] >= res["uniform"]["effective_ratio"] + 0.1


def test_batch_metrics_count_prompts_with_rollouts_only():
    cfg = SimConfig(**SMALL)
    trees, budget = run_batch(cfg, "trace", 0, 0)
    m = batch_metrics(trees + [SimTree(SimPrompt(99, 0.5, 0.5, 0.5))], budget)
    assert m["prompts"] == len(trees) and m["leaves"] == m["leaves_generated"] == sum(len(t.leaves()) for t in trees)


def test_bad_options_fail_with_one_line():
    for bad in (dict(difficulty="beta:0,1"), dict(turn_tokens="60-20"), dict(turn_strength=1.5)):
        with pytest.raises(OptionError):
            SimConfig(**bad)


def test_cli_defaults_match_simconfig():
    args = build_parser().parse_args(["sim"])
    default = SimConfig()
    for key, value in vars(args).items():
        if hasattr(default, key):
            assert getattr(default, key) == value, key


def test_cli_json_parses(capsys):
    code = main(["sim", "--allocator", "all", "--prompts", "6", "--batches", "2", "--seeds", "2", "--oracle",
                 "--difficulty", "beta:2,5", "--json"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert list(res["allocators"]) == list(ORDER) and res["config"]["oracle"] is True
    for row in res["allocators"].values():
        for key in ("effective_ratio", "mixed_anchors", "expected_contrast", "realised_contrast", "leaves", "tokens"):
            assert key in row
    assert main(["sim", "--allocator", "nope"]) == 2 and "valid:" in capsys.readouterr().err


def _two_chain_tree() -> SimTree:
    """Root → chains A (node 1 → leaf 2, success) and B (node 3 → leaf 4, failure), plus a second leaf
    below node 1 (5, failure): node 1 is mixed, node 3 is not."""
    t = SimTree(SimPrompt(0, 0.5, 0.5, 0.5))
    a = t.add(0, 0.5, 0.5, 10, False, None, 0)
    t.add(a, 1.0, 0.5, 10, True, 1, 0)
    b = t.add(0, 0.5, 0.5, 10, False, None, 1)
    t.add(b, 0.0, 0.5, 10, True, 0, 1)
    t.add(a, 0.0, 0.5, 10, True, 0, 0)
    return t


def test_stage2_expands_only_prefixes_whose_leaves_share_one_outcome():
    from tracerl.sim.allocators import _stage2
    from tracerl.sim.world import TokenBudget

    carried = []
    for rounds, seed in itertools.product([1, 2], range(8)):
        cfg = SimConfig(turns=2, rounds=rounds, stage2_root=False, expansions=2, anchor_cap=4)
        tree = _two_chain_tree()
        (left,) = _stage2([tree], [1], TokenBudget(10**6, World(cfg, random.Random(seed))), cfg)  # 2 continuations
        new = list(range(6, len(tree)))
        assert tree.parent.count(1) == 2  # node 1 is mixed from the start: never expanded
        assert all(tree.parent[n] == 3 for n in new) and len(new) + left == 2
        if rounds == 1:
            assert left == 0
        else:  # round 2 re-scores: once node 3's first continuation succeeds it is mixed, no anchor is left
            assert left == tree.reward[6]
            carried.append(left)
    assert 0 in carried and 1 in carried  # both branches of the re-scoring were exercised


def test_stage2_restarts_a_prompt_from_its_root_when_no_prefix_is_left():
    from tracerl.sim.allocators import _stage2
    from tracerl.sim.world import TokenBudget

    cfg = SimConfig(turns=1, rounds=2, expansions=2)  # one-turn chains: no prefix to continue from
    for root, want_left in ((True, 0), (False, 4)):
        cfg.stage2_root = root
        world = World(cfg, random.Random(0))
        tree = SimTree(SimPrompt(0, 0.0, 0.3, 0.0))  # V = 0: every chain fails, the root is never mixed
        budget = TokenBudget(10**6, world)
        for j in range(2):
            budget.grow(tree, 0, branch=j)
        left = _stage2([tree], [2], budget, cfg)
        assert left == [want_left] and tree.root_chains == 2 + (4 - want_left)
