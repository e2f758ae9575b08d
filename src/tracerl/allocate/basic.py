"""The allocation context, the registry, and the uniform (GRPO chains) and random-expansion
(Tree-GRPO) allocators. With `rollout.token_budget`, every allocator spends exactly the step's budget
of generated tokens, within one trajectory (`tracerl.allocate.budget`), so methods meet at equal
measured cost."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from tracerl.allocate.budget import CarriesCosts, CostModel, Meter
from tracerl.config import AllocConfig, RolloutConfig
from tracerl.envs.base import Task
from tracerl.errors import OptionError, TracerlError
from tracerl.registry import Registry
from tracerl.tree import RolloutTree

if TYPE_CHECKING:
    from tracerl.allocate.engine import TreeEngine, ValuePredictor


@dataclass
class AllocationContext:
    """Everything an allocator may use besides the step's prompts: the engine that grows trees (and
    measures their cost), the rollout and alloc sections, the step's RNG, the success predictor (for
    allocators registered with `uses_predictor`), each prompt's latest empirical success rate, and a
    source of further prompts (pools, DAPO's refills). Allocators add their own metrics to `metrics`.

    `costs` holds the running cost estimates across steps (f, mean chain tokens); left None, it is the
    predictor's (saved in its checkpoint state) when the predictor carries one, else a fresh one."""

    engine: "TreeEngine"  # tracerl.rollout.RolloutEngine, or the simulator's SimEngine
    rollout: RolloutConfig
    rng: random.Random
    alloc: AllocConfig = field(default_factory=AllocConfig)
    predictor: "ValuePredictor | None" = None  # a SuccessPredictor, or the simulator's SimPredictor
    prompt_stats: Mapping[str, float] = field(default_factory=dict)  # task id -> latest success rate
    draw: Callable[[int], list[Task]] | None = None  # n more prompts, none of them drawn before this step
    metrics: dict[str, float] = field(default_factory=dict)
    drawn: int = 0  # prompts obtained from `draw` this step
    costs: CostModel | None = None

    def __post_init__(self) -> None:
        if self.costs is None:
            carried = self.predictor.costs if isinstance(self.predictor, CarriesCosts) else None
            self.costs = carried if carried is not None else CostModel()

    def more_tasks(self, n: int) -> list[Task]:
        """Up to n further prompts for this step (fewer if the split runs out)."""
        if n <= 0:
            return []
        if self.draw is None:
            raise TracerlError("this allocator needs more prompts than the batch, but no prompt source was given")
        out = self.draw(n)
        self.drawn += len(out)
        return out

    def step_budget(self, prompts: int) -> int | None:
        """Generated tokens the step may spend with rollout.token_budget set (budget × prompts), else None."""
        return self.rollout.token_budget * prompts if self.rollout.token_budget else None

    def meter(self, prompts: int) -> Meter:
        """The step's meter: every job of the allocator runs through it (budget of `prompts` prompts)."""
        return Meter(self.engine, self.step_budget(prompts), prompts, self.costs, self.alloc.continuation_fraction,
                     self.rollout.max_budget_waves, self.alloc.cost_ema)


Allocator = Callable[[AllocationContext, list[Task]], list[RolloutTree]]
# Traits: uses_predictor — it reads `ctx.predictor` (the trainer then builds and trains one);
# makes_trees — its trees branch below the root (tree estimators need that); check — a function
# (RolloutConfig, AllocConfig) -> a one-line problem or None, run before training starts.
ALLOCATORS: Registry[Allocator] = Registry("allocator", traits={"uses_predictor": False, "makes_trees": False,
                                                                  "check": None})


def check_tree_shape(m: int, n: int, l: int, k: int | None) -> None:
    """Tree-GRPO's sizes: M trees, N expansions per round, L rounds, K kept leaves (K ≤ 1 + N·L)."""
    if m < 1 or n < 1 or l < 0:
        raise OptionError(f"tree sizes need M ≥ 1, N ≥ 1, L ≥ 0; got M={m}, N={n}, L={l}")
    if k is not None and not 1 <= k <= 1 + n * l:
        raise OptionError(f"rollout.leaves_per_tree (K) = {k} must be between 1 and 1 + N·L = {1 + n * l} "
                          f"(N = {n} expansions per round, L = {l} rounds)")


def round_robin(trees: list[RolloutTree], per_tree: list[int] | int) -> list[tuple[RolloutTree, int]]:
    """Root jobs, per_tree[k] for trees[k], in rounds: every tree's j-th before any tree's (j+1)-th,
    so a budget that stops part-way leaves the counts within one of each other."""
    counts = per_tree if isinstance(per_tree, list) else [per_tree] * len(trees)
    return [(t, 0) for j in range(max(counts, default=0)) for t, c in zip(trees, counts) if c > j]


def grown(trees: list[RolloutTree]) -> list[RolloutTree]:
    """The trees that got a trajectory (a budget may stop before reaching some), groups renumbered 0, 1, ..."""
    out = [t for t in trees if len(t.nodes) > 1 or t.root.done]
    ids: dict[int, int] = {}
    for t in out:
        ids.setdefault(t.group, len(ids))
    for t in out:
        t.group = ids[t.group]
    return out


@ALLOCATORS.register("uniform")
def uniform(ctx: AllocationContext, tasks: list[Task]) -> list[RolloutTree]:
    """GRPO: G chains from each prompt's root (one tree per prompt whose leaves are all root children).

    With `token_budget` set, the step spends exactly its budget (within one trajectory): chains go to
    the prompts in rounds (every prompt's j-th chain before any prompt's (j+1)-th), G rounds and then
    more, until the budget is met, so the last round may leave some prompts one chain short of the rest."""
    engine, cfg = ctx.engine, ctx.rollout
    meter = ctx.meter(len(tasks))
    trees = engine.plant(tasks, 1)
    counts = {id(t): cfg.group_size for t in trees}  # chains per prompt once the G rounds have run

    def more(n: int) -> list[tuple[RolloutTree, int]]:  # the next n chains of the rounds past G
        jobs: list[tuple[RolloutTree, int]] = []
        open_ = [t for t in trees if not t.root.done]
        while open_ and len(jobs) < n:
            low = min(counts[id(t)] for t in open_)
            for t in open_:
                if counts[id(t)] == low and len(jobs) < n:
                    jobs.append((t, 0))
                    counts[id(t)] += 1
        return jobs

    meter.run(round_robin(trees, cfg.group_size), top_up=more)  # the G rounds' last wave takes the first extra chains
    meter.finish(ctx.metrics)
    return grown(trees)


@ALLOCATORS.register("tree_grpo", makes_trees=True)
def tree_grpo(ctx: AllocationContext, tasks: list[Task]) -> list[RolloutTree]:
    """Tree-GRPO (arXiv 2509.21240): M trees per prompt, each seeded by one chain; L rounds in which
    N nodes per tree are drawn uniformly with replacement from the root and its non-leaf nodes and
    continued to the end; then K random leaves are kept per tree.

    With `token_budget` set, the step spends exactly its budget (within one trajectory): the seed
    chains and each round's draws run in budget-sized waves (every tree's k-th draw before any tree's
    (k+1)-th) and stop once the budget is met; rounds go on past L (up to `max_budget_waves` more)
    while it is not, and no leaf is pruned unless K is given."""
    engine, cfg, rng = ctx.engine, ctx.rollout, ctx.rng
    m, n, l, k = cfg.trees_per_prompt, cfg.expansions, cfg.rounds, cfg.leaves_per_tree
    check_tree_shape(m, n, l, None if cfg.token_budget else k)
    meter = ctx.meter(len(tasks))
    trees = engine.plant(tasks, m)
    meter.run(sorted(((t, 0) for t in trees), key=lambda j: j[0].index))  # every prompt's first tree first
    extra = cfg.max_budget_waves if cfg.token_budget else 0
    for r in range(l + extra):
        if meter.exhausted:
            break
        draws = []
        for t in trees:
            anchors = t.anchors()  # candidates fixed at the start of the round
            if anchors:
                draws += [(d, (t, rng.choice(anchors))) for d in range(n)]
        if not draws:
            break
        meter.run([job for _, job in sorted(draws, key=lambda x: x[0])], continuation=True)
        if r >= l:
            meter.added_waves += 1
    if k is not None:
        for t in trees:
            t.keep_random_leaves(k, rng)
    meter.finish(ctx.metrics)
    return grown(trees)


def match_tree_shape(group_size: int, f: float, max_trees: int | None = None, n_choices=(1, 2, 3, 4),
                     l_choices=(1, 2, 3)) -> dict[str, float]:
    """Pick Tree-GRPO sizes (M, N, L) whose expected cost M·(1 + N·L·f) chain-equivalents is closest
    to G chains, given the *measured* continuation fraction `f` (continuation tokens / chain tokens).

    Ties go to more leaves per unit cost, then to fewer rounds. K keeps every leaf (1 + N·L)."""
    if group_size < 1 or not 0 < f <= 2:
        raise OptionError(f"match_tree_shape: need group_size ≥ 1 and 0 < f ≤ 2, got G={group_size}, f={f}")
    best = None
    for m in range(1, (max_trees or group_size) + 1):
        for n in n_choices:
            for l in l_choices:
                cost = m * (1 + n * l * f)
                leaves = m * (1 + n * l)
                key = (abs(cost - group_size), -leaves / cost, l)
                if best is None or key < best[0]:
                    best = (key, {"trees_per_prompt": m, "expansions": n, "rounds": l, "leaves_per_tree": 1 + n * l,
                                  "expected_cost_chains": cost, "leaves": leaves})
    return best[1]
