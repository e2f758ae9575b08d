"""The allocation context, the registry, and the uniform (GRPO chains) and random-expansion
(Tree-GRPO) allocators, with the optional per-prompt generated-token budget that puts methods on
equal measured cost."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

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
    source of further prompts (pools, DAPO's refills). Allocators add their own metrics to `metrics`."""

    engine: "TreeEngine"  # tracerl.rollout.RolloutEngine, or the simulator's SimEngine
    rollout: RolloutConfig
    rng: random.Random
    alloc: AllocConfig = field(default_factory=AllocConfig)
    predictor: "ValuePredictor | None" = None  # a SuccessPredictor, or the simulator's SimPredictor
    prompt_stats: Mapping[str, float] = field(default_factory=dict)  # task id -> latest success rate
    draw: Callable[[int], list[Task]] | None = None  # n more prompts, none of them drawn before this step
    metrics: dict[str, float] = field(default_factory=dict)
    drawn: int = 0  # prompts obtained from `draw` this step

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


def _prompt_tokens(trees: list[RolloutTree]) -> dict[int, int]:
    """Generated tokens so far per prompt group (every node ever attached; pruning comes last)."""
    used: dict[int, int] = defaultdict(int)
    for t in trees:
        used[t.group] += t.gen_tokens()
    return used


@ALLOCATORS.register("uniform")
def uniform(ctx: AllocationContext, tasks: list[Task]) -> list[RolloutTree]:
    """GRPO: G chains from each prompt's root (one tree per prompt whose leaves are all root children).

    With `token_budget` set, chains are added to each prompt in waves until it has spent its budget
    (each wave sized from the prompt's measured mean chain length; at least `group_size` chains)."""
    engine, cfg = ctx.engine, ctx.rollout
    trees = engine.plant(tasks, 1)
    engine.grow([(t, 0) for t in trees for _ in range(cfg.group_size)])
    if cfg.token_budget:
        for _ in range(cfg.max_budget_waves):
            used = _prompt_tokens(trees)
            jobs = []
            for t in trees:
                left = cfg.token_budget - used[t.group]
                n_leaves = len(t.leaf_ids())
                if left <= 0 or not t.anchors():
                    continue
                mean_len = max(used[t.group] / max(n_leaves, 1), 1.0)
                jobs += [(t, 0)] * max(1, math.floor(left / mean_len))
            if not jobs:
                break
            engine.grow(jobs)
    return trees


@ALLOCATORS.register("tree_grpo", makes_trees=True)
def tree_grpo(ctx: AllocationContext, tasks: list[Task]) -> list[RolloutTree]:
    """Tree-GRPO (arXiv 2509.21240): M trees per prompt, each seeded by one chain; L rounds in which
    N nodes per tree are drawn uniformly with replacement from the root and its non-leaf nodes and
    continued to the end; then K random leaves are kept per tree.

    With `token_budget` set, rounds go on past L (up to `max_budget_waves` more) for each tree that
    has not spent its share (budget / M) of the prompt's budget, and no leaf is pruned unless K is given."""
    engine, cfg, rng = ctx.engine, ctx.rollout, ctx.rng
    m, n, l, k = cfg.trees_per_prompt, cfg.expansions, cfg.rounds, cfg.leaves_per_tree
    check_tree_shape(m, n, l, None if cfg.token_budget else k)
    trees = engine.plant(tasks, m)
    engine.grow([(t, 0) for t in trees])
    extra = cfg.max_budget_waves if cfg.token_budget else 0
    for r in range(l + extra):
        jobs = []
        for t in trees:
            # with a budget, each of the M trees may spend its share of the prompt's budget
            if cfg.token_budget and t.gen_tokens() >= cfg.token_budget / m:
                continue
            anchors = t.anchors()  # candidates fixed at the start of the round
            if anchors:
                jobs += [(t, rng.choice(anchors)) for _ in range(n)]
        if not jobs:
            break
        engine.grow(jobs, continuation=True)
    if k is not None:
        for t in trees:
            t.keep_random_leaves(k, rng)
    return trees


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
