"""Simulator allocators: where one batch's token budget goes (METHODS.md §2, §3, §4).

Each one has the signature

    fn(world: World, prompts: PromptStream, budget: TokenBudget, cfg: SimConfig) -> list[SimTree]

and generates only through `budget.grow`, so all follow the same overshoot rule (world.TokenBudget)
and the same charge (the tokens of the nodes they create). Every allocator keeps going until the
budget is spent, except DAPO once it has B mixed groups: uniform and PCL add chains round-robin,
Tree-GRPO adds rounds, Knapsack and TRACE add root chains by their Stage 1 marginal gain.
The trees returned are every tree generated (DAPO's dropped groups too, with `kept = False`).
"""

from __future__ import annotations

import heapq
from typing import Callable

from tracerl.allocate.solvers import (ROOT_SOLVERS, contrast, expansion_gains, knapsack_counts, pcl_select,
                                      prefix_allocate_greedy)
from tracerl.registry import Registry
from tracerl.sim.world import PromptStream, SimConfig, SimTree, TokenBudget, World

SimAllocator = Callable[[World, PromptStream, TokenBudget, SimConfig], list[SimTree]]
SIM_ALLOCATORS: Registry[SimAllocator] = Registry("simulator allocator")
ORDER = ("uniform", "tree_grpo", "dapo", "pcl", "knapsack", "trace")  # table order for `--allocator all`


def _chains_round_robin(trees: list[SimTree], budget: TokenBudget, rounds: int | None = None) -> None:
    """One chain per tree per round (`rounds` of them, or until the budget is spent)."""
    r = 0
    while budget.open and trees and (rounds is None or r < rounds):
        for t in trees:
            if budget.grow(t, 0, branch=t.root_chains) is None:
                return
        r += 1


def _chains_by_count(trees: list[SimTree], counts: list[int], budget: TokenBudget) -> None:
    """counts[i] more root chains for trees[i], interleaved: if the budget runs short, every tree has its
    first two before anyone gets a third."""
    for r in range(max(counts, default=0)):
        for t, m in zip(trees, counts):
            if r < m and budget.grow(t, 0, branch=t.root_chains) is None:
                return


def _fill_by_contrast(trees: list[SimTree], v: list[float], budget: TokenBudget, cap: int) -> None:
    """Spend what is left on root chains, each to the tree whose contrast(v, m) gains most from one more
    chain (m = its bare chains so far; ties: nearer 0.5, then earlier). Beyond cap the gain is 0."""
    def item(i: int) -> tuple[float, float, int]:
        m = trees[i].root_chains
        gain = contrast(v[i], m + 1) - contrast(v[i], m) if m < cap else 0.0
        return (-gain, abs(v[i] - 0.5), i)

    heap = [item(i) for i in range(len(trees))]
    heapq.heapify(heap)
    while budget.open and heap:
        i = heapq.heappop(heap)[2]
        budget.grow(trees[i], 0, branch=trees[i].root_chains)
        heapq.heappush(heap, item(i))


@SIM_ALLOCATORS.register("uniform")
def uniform(world, prompts, budget, cfg) -> list[SimTree]:
    """GRPO: chains from the roots of the first B prompts, round-robin until the budget is spent
    (with the default budget, G per prompt in expectation)."""
    trees = [SimTree(p) for p in prompts.take(0, cfg.prompts)]
    _chains_round_robin(trees, budget)
    return trees


@SIM_ALLOCATORS.register("tree_grpo")
def tree_grpo(world, prompts, budget, cfg) -> list[SimTree]:
    """Tree-GRPO (§3.1): M seed chains per prompt (branch j = tree j); then rounds in which each tree
    draws N anchors uniformly with replacement from the root and its non-leaf nodes (fixed at the start
    of the round) and continues each to the end, until the budget is spent. No pruning (K = all)."""
    trees = [SimTree(p) for p in prompts.take(0, cfg.prompts)]
    for j in range(cfg.trees):
        for t in trees:
            if budget.grow(t, 0, branch=j) is None:
                return trees
    while budget.open and cfg.expansions:
        candidates = [(t, j, t.anchors(branch=j)) for t in trees for j in range(cfg.trees)]
        for _ in range(cfg.expansions):
            for t, j, anchors in candidates:
                if budget.grow(t, anchors[world.rng.randrange(len(anchors))], branch=j) is None:
                    return trees
    return trees


def _mixed(tree: SimTree) -> bool:
    rewards = {tree.reward[i] for i in tree.leaves()}
    return len(rewards) == 2


@SIM_ALLOCATORS.register("dapo")
def dapo(world, prompts, budget, cfg) -> list[SimTree]:
    """DAPO dynamic sampling (§2): groups of G chains for the prompts still missing (B in round 1, fresh
    prompts after), groups with all-equal rewards dropped (kept = False, still charged), at most
    `dapo_rounds` rounds, stopping early once B mixed groups are found or the budget is spent."""
    trees: list[SimTree] = []
    need, start = cfg.prompts, 0
    for _ in range(cfg.dapo_rounds):
        group = [SimTree(p) for p in prompts.take(start, need)]
        start += need
        _chains_round_robin(group, budget, rounds=cfg.group_size)
        group = [t for t in group if len(t) > 1]
        for t in group:
            t.kept = _mixed(t)
        trees += group
        need -= sum(t.kept for t in group)
        if need <= 0 or not budget.open:
            break
    return trees


@SIM_ALLOCATORS.register("pcl")
def pcl(world, prompts, budget, cfg) -> list[SimTree]:
    """PCL-style filtering (§2): the predictor scores a pool of pool_factor·B roots; the B with the
    smallest |Ṽ − 0.5| get chains round-robin (G each in expectation)."""
    pool = prompts.take(0, cfg.pool_factor * cfg.prompts)
    chosen = pcl_select([p.predicted for p in pool], cfg.prompts)
    trees = [SimTree(pool[i]) for i in chosen]
    _chains_round_robin(trees, budget)
    return trees


def _chain_equivalents(budget: TokenBudget, cfg: SimConfig) -> int:
    return int(budget.limit / cfg.expected_chain_tokens())


@SIM_ALLOCATORS.register("knapsack")
def knapsack(world, prompts, budget, cfg) -> list[SimTree]:
    """Knapsack-style counts (§2): the Stage 1 DP over the B prompts' empirical success rates from their
    last visit, for the budget in chain-equivalents; root chains only; leftover by marginal contrast."""
    batch = prompts.take(0, cfg.prompts)
    rates = [p.last_rate for p in batch]
    m = min(_chain_equivalents(budget, cfg), cfg.root_cap * len(batch))
    counts = knapsack_counts(rates, m, cfg.root_cap) if m >= 2 else [0] * len(batch)
    trees = [SimTree(p) for p in batch]
    _chains_by_count(trees, counts, budget)
    _fill_by_contrast(trees, rates, budget, cfg.root_cap)
    return [t for t in trees if len(t) > 1]


def _outcomes_below(tree: SimTree) -> list[set[int]]:
    """The set of leaf rewards below each node (a leaf's own reward included)."""
    out: list[set[int]] = [set() for _ in range(len(tree))]
    for leaf in tree.leaves():
        node = leaf
        while node >= 0:
            out[node].add(tree.reward[leaf])
            node = tree.parent[node]
    return out


def _stage2(trees: list[SimTree], counts: list[int], budget: TokenBudget, cfg: SimConfig) -> list[int]:
    """Stage 2 (§4.3) per prompt, m_i·N continuations in `cfg.rounds` slices. In each slice the anchors are
    the prompt's non-leaf prefixes (continuations' ones included; the root too with `stage2_root`)
    whose leaves all share one outcome r, scored with Ṽ at the prefix; an anchor whose leaves are
    already mixed gains nothing more. All prompts' continuations of a slice run in order of decreasing
    gain. What a prompt cannot place (too few anchors) carries to its next slice; returns what is left
    after the last."""
    totals = [m * cfg.expansions for m in counts]
    carry = [0] * len(trees)
    first = 0 if cfg.stage2_root else 1
    for r in range(cfg.rounds):
        jobs = []
        for i, (t, total) in enumerate(zip(trees, totals)):
            k = total // cfg.rounds + (r < total % cfg.rounds) + carry[i]
            below = _outcomes_below(t)
            nodes = [n for n in range(first, len(t)) if not t.done[n] and len(below[n]) == 1]
            anchors = [(next(iter(below[n])), t.pred[n]) for n in nodes]
            plan, carry[i] = prefix_allocate_greedy(anchors, k, cfg.anchor_cap)
            jobs += [(-gain, i, nodes[j]) for gain, j in expansion_gains(anchors, plan)]
        for _, i, node in sorted(jobs):
            branch = trees[i].root_chains if node == 0 else trees[i].branch[node]
            if budget.grow(trees[i], node, branch=branch) is None:
                return carry
    return carry


@SIM_ALLOCATORS.register("trace")
def trace(world, prompts, budget, cfg) -> list[SimTree]:
    """TRACE (§4.1–4.3): root budget M = C / (1 + N·f) bare rollouts (C = budget in chain-equivalents);
    a pool of pool_factor·B prompts (as PCL) scored by the predictor; 2⌊εM/2⌋ rollouts to random pool
    prompts, 2 each, the rest split by the Stage 1 solver; then Stage 2 in `rounds` slices with the
    observed outcomes and predicted prefix values; Stage 2 leftovers become root chains of their
    prompt, the rest of the budget root chains by Stage 1 marginal gain."""
    root_m = max(2, round(_chain_equivalents(budget, cfg) / (1 + cfg.expansions * cfg.continuation_fraction)))
    pool = prompts.take(0, cfg.pool_factor * cfg.prompts)
    n_explore = min(2 * int(cfg.explore * root_m / 2), 2 * len(pool))
    explored = set(world.rng.sample(range(len(pool)), n_explore // 2))
    rest = [i for i in range(len(pool)) if i not in explored]
    dp_budget = min(root_m - n_explore, cfg.root_cap * len(rest))
    counts = [2 if i in explored else 0 for i in range(len(pool))]
    if dp_budget >= 2:
        solve = ROOT_SOLVERS[cfg.root_solver]
        for i, m in zip(rest, solve([pool[i].predicted for i in rest], dp_budget, cfg.root_cap)):
            counts[i] = m
    active = [i for i, m in enumerate(counts) if m > 0]
    trees, counts = [SimTree(pool[i]) for i in active], [counts[i] for i in active]
    _chains_by_count(trees, counts, budget)
    leftover = _stage2(trees, counts, budget, cfg)
    _chains_by_count(trees, leftover, budget)
    _fill_by_contrast(trees, [t.prompt.predicted for t in trees], budget, cfg.root_cap)
    return [t for t in trees if len(t) > 1]
