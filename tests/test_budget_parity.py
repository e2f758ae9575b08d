"""Budget parity (issue 18, item 3): with `rollout.token_budget`, every allocator spends the step's budget
within one trajectory; TRACE sizes Stage 1 from a running measurement of f and charges a root restart
as a whole bare chain; the running f survives a checkpoint; tokens the policy generates as its own
annotator are counted in `gen_tokens` / `cum_gen_tokens`."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest
import torch

from conftest import SMALL_WORLD
from tracerl.allocate import ALLOCATORS, AllocationContext
from tracerl.allocate.budget import CostModel, Meter
from tracerl.allocate.solvers import prefix_allocate_costed, prefix_allocate_greedy
from tracerl.backends.hf import SamplingParams
from tracerl.config import AllocConfig, PredictorConfig, RolloutConfig, load_config
from tracerl.rollout import RolloutEngine
from tracerl.sim import SimConfig, build_config, run_batch
from tracerl.sim.engine import SimEngine
from tracerl.sim.world import PromptStream, World

COST_EMA = AllocConfig().cost_ema  # alloc.cost_ema's default

WORLDS = {"default": SimConfig(), "four-turns": SimConfig(turns=4, turn_tokens="10-90"),
          "early-stop": SimConfig(early_stop=0.4, turns=4), "one-turn": SimConfig(turns=1)}


def _check_parity(name: str, b, spent: int) -> None:
    """budget ≤ spent < budget + the longest trajectory of the last wave (DAPO may stop below it when its
    groups are all mixed or its rounds are used up)."""
    m = b.metrics
    assert m["budget_overshoot"] == spent - b.budget  # the meter's count is the engine's, token for token
    assert spent - b.budget <= m["budget_last_wave_max"], (name, spent, b.budget)
    if spent < b.budget:
        assert name == "dapo" and (m["dapo_groups_kept"] == 64 or m["dapo_rounds"] == 3), (name, spent, b.budget)


@pytest.mark.parametrize("world", WORLDS, ids=str)
@pytest.mark.parametrize("name", ALLOCATORS.names())
def test_every_allocator_spends_the_step_budget_within_one_trajectory(name, world):
    sim = WORLDS[world]
    G_chains = round(8 * sim.expected_chain_tokens())
    for scale, seed in itertools.product((0.5, 1.0, 2.0), range(2)):  # budgets of 4, 8 and 16 chains a prompt
        cfg = build_config(sim, [f"rollout.token_budget={round(scale * G_chains)}"], name)
        costs = CostModel()  # carried over the batches, as over training steps
        for batch in range(3):
            b = run_batch(sim, cfg, seed, batch, costs)
            _check_parity(name, b, b.engine.cost.gen_tokens)
            assert b.metrics["budget_waves"] <= cfg.rollout.max_budget_waves


def test_without_a_budget_chain_allocators_keep_their_sizes():
    sim = SimConfig()
    for name, want in (("uniform", 64 * 8), ("knapsack", 64 * 8), ("pcl", 64 * 8)):
        b = run_batch(sim, build_config(sim, ["rollout.token_budget=null"], name), 0, 0)
        assert b.engine.cost.trajectories == want and b.metrics["gen_waves"] == 1, name
    tree = run_batch(sim, build_config(sim, ["rollout.token_budget=null"], "tree_grpo"), 0, 0)
    assert tree.engine.cost.trajectories == 64 * 2 * (1 + 2 * 1)  # M(1 + N·L) per prompt


def test_uniform_under_a_budget_plants_chains_in_rounds():
    sim = SimConfig()
    b = run_batch(sim, build_config(sim, [], "uniform"), 1, 0)  # the budget: G = 8 chains a prompt in expectation
    counts = sorted(len(t.root.children) for t in b.trees)
    assert counts[-1] - counts[0] <= 1 and 7 <= counts[0] <= 9  # the last round may leave some a chain short


def test_the_meter_waves_shrink_to_a_single_last_trajectory():
    sim = SimConfig()
    eng = SimEngine(World(sim, random.Random(0)))
    trees = eng.plant(PromptStream(sim, 8, 0, 0).batch(16), 1)
    meter = Meter(eng, 16 * 8 * 120, 16, CostModel(), 0.5)
    sizes = []
    while not meter.met:
        n = meter.wave_size([0] * 1000)
        sizes.append(n)
        meter.launch([(trees[i % 16], 0) for i in range(n)])
    assert sizes[0] == 16  # nothing measured yet: a pilot of B
    assert sizes[1] == max(sizes) and sizes[-1] <= 2  # then sized from what is left, down to one or two
    assert meter.spent == eng.cost.gen_tokens and meter.spent - meter.budget <= meter.last_wave_max
    assert meter.waves == len(sizes) <= 8


# ---------------------------------------------------------------------------------- the running f


def test_running_f_is_the_ema_of_the_measured_f_and_converges_to_it():
    sim = SimConfig(turns=4, turn_tokens="10-90")
    cfg = build_config(sim, ["rollout.prompts_per_step=16", "alloc.continuation_fraction=1.5"], "trace")
    costs, expect, measured, stage1 = CostModel(), 1.5, [], []
    for batch in range(25):
        b = run_batch(sim, cfg, 0, batch, costs)
        assert b.metrics["f_planned"] == pytest.approx(expect)  # Stage 1 used the running value (the prior first)
        f = b.engine.cost.continuation_fraction  # the engine's measurement: continuations / bare chains
        measured.append(f)
        stage1.append(b.metrics["stage1_rollouts"])
        expect = (1 - COST_EMA) * expect + COST_EMA * f
        assert costs.f == pytest.approx(expect) == b.metrics["f_running"]
    settled = statistics.fmean(measured[-10:])
    assert abs(costs.f - settled) < 0.05 and abs(1.5 - settled) > 0.5, (costs.f, settled)
    # with the measured f (≈ 0.5), Stage 1 sizes to the budget: M·(1 + N·f) chains ≈ B·G
    assert stage1[0] == round(16 * 8 / (1 + 2 * 1.5)) and statistics.fmean(stage1[-5:]) > 1.5 * stage1[0]


def test_running_costs_round_trip_through_the_predictor_checkpoint_state():
    from tracerl.allocate.predictor import SuccessPredictor
    from tracerl.allocate.sharded import ShardedPredictor

    pred = SuccessPredictor(PredictorConfig(hidden=8), hidden_size=6, max_turns=4)
    pred.costs.observe(0.42, 37.0, COST_EMA, 0.5)
    twin = SuccessPredictor(PredictorConfig(hidden=8), hidden_size=6, max_turns=4)
    twin.load_state(*pred.state())
    assert twin.costs == pred.costs and twin.costs.f == pytest.approx(0.7 * 0.5 + 0.3 * 0.42)
    tensors, meta = pred.state()
    del meta["costs"]  # a checkpoint written before the running estimates: never measured
    twin.load_state(tensors, meta)
    assert twin.costs == CostModel()
    # allocators find them through the context: the predictor's, also behind ShardedPredictor
    eng = SimEngine(World(SimConfig(), random.Random(0)))
    assert AllocationContext(eng, RolloutConfig(), random.Random(0), predictor=pred).costs is pred.costs
    sharded = ShardedPredictor(pred, world=None)
    assert AllocationContext(eng, RolloutConfig(), random.Random(0), predictor=sharded).costs is pred.costs
    assert AllocationContext(eng, RolloutConfig(), random.Random(0)).costs == CostModel()


# ---------------------------------------------------------------------------------- root restarts


def test_a_root_restart_costs_a_whole_chain_in_stage2():
    # solver: 4 units with f = 0.5; a root restart costs 1/f = 2 units, a prefix continuation 1
    plan = prefix_allocate_costed([(0, 0.5)], 4.0, 8, [2.0])
    assert plan.counts == [2] and plan.leftover == pytest.approx(0.0)
    plan = prefix_allocate_costed([(0, 0.5), (1, 0.5)], 4.0, 8, [2.0, 1.0])
    assert sum(c * w for c, w in zip(plan.counts, (2.0, 1.0))) == pytest.approx(4.0)
    # unit costs: the same counts as the unit-cost greedy
    anchors = [(0, 0.3), (1, 0.6), (0, 0.9), (1, 0.1)]
    for k in range(12):
        assert prefix_allocate_costed(anchors, k, 3, [1.0] * 4).counts == prefix_allocate_greedy(anchors, k, 3).counts
    # one-turn chains have no prefix: all of Stage 2 goes to root restarts and leftover bare chains, m_i·N·f
    # chains' worth (not m_i·N chains, as when a restart counted as one continuation)
    sim = SimConfig(turns=1)
    for seed in range(3):
        b = run_batch(sim, build_config(sim, ["rollout.token_budget=null", "rollout.prompts_per_step=16"], "trace"),
                      seed, 0)
        c, m = b.engine.cost, b.metrics
        M, prompts = m["stage1_rollouts"], len({t.group for t in b.trees})
        assert c.continuations == 0 and m["stage2_restarts"] > 0
        assert abs(m["stage2_restarts"] + m["stage2_leftover"] - M * 2 * 0.5) <= prompts, m
        assert c.trajectories == M + m["stage2_restarts"] + m["stage2_leftover"]


# ---------------------------------------------------------------------------------- fewer generation calls


def test_grow_charges_continuations_per_job():
    sim = SimConfig(turns=3)
    eng = SimEngine(World(sim, random.Random(0)))
    trees = eng.plant(PromptStream(sim, 8, 0, 0).batch(2), 1)
    eng.grow([(t, 0) for t in trees])
    before = eng.cost.gen_tokens
    mid = [(t, t.path(max(t.nodes))[1].id) for t in trees]  # each chain's first turn node
    leaves = eng.grow([mid[0], (trees[1], 0), mid[1]], [True, False, True])
    tokens = [sum(len(n.gen_ids) for n in t.path(leaf)[t.nodes[node].depth + 1:])
              for (t, node), leaf in zip([mid[0], (trees[1], 0), mid[1]], leaves)]
    assert eng.cost.continuations == 2 and eng.cost.trajectories == 5
    assert eng.cost.continuation_gen_tokens == tokens[0] + tokens[2]
    assert eng.cost.gen_tokens == before + sum(tokens)
    with pytest.raises(ValueError, match="2 continuation flags for 3 jobs"):
        eng.grow([mid[0], (trees[1], 0), mid[1]], [True, False])


class _Calls(SimEngine):
    """The simulator's engine, recording each generation call as (phase, [job from the root?])."""

    phase = "stage1"

    def __init__(self, world):
        super().__init__(world)
        self.calls = []

    def grow(self, jobs, continuation=False):
        self.calls.append((_Calls.phase, [node == 0 for _, node in jobs]))
        return super().grow(jobs, continuation)


def _trace_calls(monkeypatch, sim, overrides, seed):
    """A TRACE step in the simulator; returns its batch and its generation calls by phase (stage1 /
    stage2 / after: the leftover chains and the budget's top-up)."""
    import tracerl.allocate.budgeted as budgeted
    import tracerl.sim.run as simrun

    made, stage2 = [], budgeted._stage2

    def staged(*a, **k):
        _Calls.phase = "stage2"
        try:
            return stage2(*a, **k)
        finally:
            _Calls.phase = "after"

    _Calls.phase = "stage1"
    monkeypatch.setattr(simrun, "SimEngine", lambda world: made.append(_Calls(world)) or made[-1])
    monkeypatch.setattr(budgeted, "_stage2", staged)
    b = run_batch(sim, build_config(sim, overrides, "trace"), seed, 0)
    assert b.metrics["gen_waves"] == len(made[0].calls)
    return b, {ph: [c for p, c in made[0].calls if p == ph] for ph in ("stage1", "stage2", "after")}


def test_trace_sends_each_stage2_slice_in_one_generation_call(monkeypatch):
    # two-turn chains: a slice places continuations from the first turn and root restarts; they go
    # out together, one call per slice (before: continuations, then restarts, two calls)
    mixed = 0
    for seed in range(4):
        b, calls = _trace_calls(monkeypatch, SimConfig(turns=2), ["rollout.token_budget=null",
                                "rollout.prompts_per_step=16", "alloc.rounds=2", "alloc.stage2_root=true"], seed)
        assert len(calls["stage2"]) <= 2
        mixed += sum(any(c) and not all(c) for c in calls["stage2"])
        assert len(calls["after"]) == int(b.metrics["stage2_leftover"] > 0)  # no budget: one call for the leftover
    assert mixed >= 2  # restarts and continuations did share calls


def test_trace_last_slice_takes_the_leftover_and_the_top_up_into_its_call(monkeypatch):
    # with a budget, Stage 2's last slice runs its placements, the bare chains of what it could not
    # place and the budget's top-up: its last wave is filled with top-up chains, then top-up waves follow;
    # nothing is generated after Stage 2 (before: a leftover wave, then top-up waves of its own)
    sim = SimConfig(turns=1)
    G = round(8 * sim.expected_chain_tokens())
    both = 0
    for seed in range(4):
        b, calls = _trace_calls(monkeypatch, sim, [f"rollout.token_budget={2 * G}", "rollout.prompts_per_step=16",
                                                   "alloc.stage2_root=true"], seed)
        m = b.metrics
        _check_parity("trace", b, b.engine.cost.gen_tokens)
        assert calls["after"] == []
        assert len(calls["stage2"]) >= m["budget_waves"] + 1
        both += bool(m["stage2_leftover"] and m["budget_chains"])
    assert both  # some step had both leftover and top-up chains


def test_the_plan_last_wave_takes_top_up_chains():
    # Meter.run with top_up: the plan's jobs fit in one wave with room, so that wave also carries top-up
    # chains (one generation call); fill waves follow until the budget is met, within one trajectory
    sim = SimConfig()
    made = []
    eng = _Calls(World(sim, random.Random(0)))
    trees = eng.plant(PromptStream(sim, 8, 0, 0).batch(8), 1)
    chain = sim.expected_chain_tokens()
    meter = Meter(eng, round(40 * chain), 8, CostModel(chain_tokens=chain), 0.5)

    def more(n):
        made.append(n)
        return [(trees[k % len(trees)], 0) for k in range(n)]

    meter.run([(t, 0) for t in trees], top_up=more)
    first = eng.calls[0][1]
    assert len(first) > len(trees) and made[0] == len(first) - len(trees)  # the plan's 8 jobs + top-up chains
    assert meter.spent >= meter.budget and meter.spent - meter.budget <= meter.last_wave_max
    assert len(eng.calls) == 1 + meter.added_waves
    # without top_up the plan's wave is the plan alone
    eng2 = _Calls(World(sim, random.Random(0)))
    trees2 = eng2.plant(PromptStream(sim, 8, 0, 0).batch(8), 1)
    Meter(eng2, round(40 * chain), 8, CostModel(chain_tokens=chain), 0.5).run([(t, 0) for t in trees2])
    assert [len(c) for _, c in eng2.calls] == [8]


# ---------------------------------------------------------------------------------- real engine


def test_real_engine_budget_parity_and_the_meter_matches_the_engine(tiny_policy, small_env):
    tasks, pool = small_env.tasks("train")[:3], small_env.tasks("train")[3:15]
    for name in ALLOCATORS.names():
        from tracerl.allocate.predictor import SuccessPredictor

        predictor = SuccessPredictor(PredictorConfig(hidden=8, warmup=0), tiny_policy.model.config.hidden_size,
                                     small_env.max_turns) if ALLOCATORS.trait(name, "uses_predictor") else None
        extra = list(pool)

        def draw(n):
            out, extra[:] = extra[:n], extra[n:]
            return out

        r = RolloutConfig(allocator=name, prompts_per_step=3, group_size=2, max_turn_tokens=12, token_budget=100,
                          trees_per_prompt=1, expansions=1)
        eng = RolloutEngine(tiny_policy, small_env, SamplingParams(12), torch.Generator().manual_seed(1),
                            capture_hidden=predictor is not None)
        ctx = AllocationContext(eng, r, random.Random(0), AllocConfig(cap_root=8), predictor, {}, draw)
        trees = ALLOCATORS.get(name)(ctx, tasks)
        spent = eng.cost.gen_tokens
        assert trees and ctx.metrics["budget_overshoot"] == spent - 300, name
        assert 300 <= spent <= 300 + ctx.metrics["budget_last_wave_max"] or name == "dapo", (name, spent)
        if predictor is not None:  # the step's measurements went into the predictor's running estimates
            assert predictor.costs.steps == 1 and predictor.costs.chain_tokens > 0


def test_self_annotator_tokens_are_counted_in_gen_tokens(tmp_path, tiny_policy):
    from tracerl.models.io import atomic_save_pretrained
    from tracerl.train import Trainer

    model_dir = atomic_save_pretrained(tiny_policy.model, tiny_policy.tokenizer, tmp_path / "tiny")
    cfg = load_config(None, [*[f"env.options.{k}={v}" for k, v in SMALL_WORLD.items()], "model.preset=path",
                             f"model.path={model_dir}", "model.max_context=1024", "rollout.prompts_per_step=2",
                             "rollout.group_size=2", "rollout.max_turn_tokens=8", "trainer.micro_batch_size=4",
                             "trainer.progress=false", "trainer.warmup_steps=0", "trainer.tensorboard=false",
                             "algo.skip_uniform_groups=false", "run.threads=1", f"run.dir={tmp_path / 'run'}",
                             "distill.mode=routed", "distill.annotator=self", "distill.annotator_max_tokens=4",
                             "distill.reverse_kl_on_errors=true", "distill.warmup_steps=0"])
    tr = Trainer(cfg, log=lambda *_: None)
    tr.setup()
    m = tr.train_step(0)
    assert m["annotator_policy_tokens"] == m["annotator_gen_tokens"] > 0
    assert m["gen_tokens"] == m["rollout_gen_tokens"] + m["annotator_policy_tokens"]
    assert m["cum_gen_tokens"] == m["gen_tokens"]
