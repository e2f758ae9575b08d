"""Allocators that decide how many rollouts each prompt gets (docs/trace.md): DAPO dynamic
sampling, PCL-style filtering, Knapsack-style counts and TRACE (Stage 1 root counts on predicted
values, Stage 2 continuations on predicted prefix values).

All of them grow trees only through `ctx.engine`, so every generated token (discarded groups
included) is charged in `engine.cost`. With `rollout.token_budget` set, the step may spend
token_budget × (prompts in the batch) generated tokens: after the allocator's plan, extra root
chains go to the prompts whose contrast gains most from one more chain until that is spent (at most
`rollout.max_budget_waves` waves, each sized from the measured mean chain length).
"""

from __future__ import annotations

import heapq
import math

from tracerl.allocate.basic import ALLOCATORS, AllocationContext
from tracerl.allocate.engine import NodeRef
from tracerl.allocate.solvers import ROOT_SOLVERS, contrast, knapsack_counts, pcl_select, prefix_allocate_greedy
from tracerl.config import AllocConfig, RolloutConfig, pool_size, root_rollouts
from tracerl.envs.base import Task
from tracerl.tree import RolloutTree


def _renumber(trees: list[RolloutTree]) -> list[RolloutTree]:
    """Contiguous group ids 0, 1, ... in order of first appearance."""
    ids: dict[int, int] = {}
    for t in trees:
        ids.setdefault(t.group, len(ids))
    for t in trees:
        t.group = ids[t.group]
    return trees


def _root_values(ctx: AllocationContext, roots: list[RolloutTree]) -> list[float] | None:
    """Predicted success of each root once the predictor is warm (prefill-only pass, charged), else None."""
    if ctx.predictor is None or not ctx.predictor.warm:
        return None
    ctx.engine.root_hidden(roots)
    return ctx.predictor.predict([NodeRef(t, 0) for t in roots])


def _marginal_picks(counts: list[int], v: list[float], n: int, cap: int) -> list[int]:
    """n more root chains, each to the prompt whose contrast(v, m) gains most (ties: nearer 0.5, then
    earlier); beyond cap the gain is 0."""
    counts = list(counts)

    def item(i: int) -> tuple[float, float, int]:
        m = counts[i]
        gain = contrast(v[i], m + 1) - contrast(v[i], m) if m < cap else 0.0
        return (-gain, abs(v[i] - 0.5), i)

    heap = [item(i) for i in range(len(counts))]
    heapq.heapify(heap)
    picks = []
    for _ in range(n if heap else 0):
        i = heapq.heappop(heap)[2]
        picks.append(i)
        counts[i] += 1
        heapq.heappush(heap, item(i))
    return picks


def _top_up(ctx: AllocationContext, prompts: list[list[RolloutTree]], v: list[float], budget: int | None,
            tree_per_chain: bool) -> int:
    """Root chains until the step's generated tokens reach `budget` (None: nothing). `prompts[i]` are
    prompt i's trees: a new chain is a new tree (`tree_per_chain`) or one more root child of the first.
    Returns the chains added."""
    eng, added = ctx.engine, 0
    if budget is None or not prompts:
        return 0
    for _ in range(ctx.rollout.max_budget_waves):
        left = budget - eng.cost.gen_tokens
        if left <= 0:
            break
        chains = eng.cost.trajectories - eng.cost.continuations
        mean_len = max((eng.cost.gen_tokens - eng.cost.continuation_gen_tokens) / max(chains, 1), 1.0)
        counts = [len(ts) if tree_per_chain else len(ts[0].root.children) for ts in prompts]
        jobs = []
        for i in _marginal_picks(counts, v, max(1, math.floor(left / mean_len)), ctx.alloc.cap_root):
            if tree_per_chain:
                new = ctx.engine.more_trees(prompts[i][0], 1, len(prompts[i]))[0]
                prompts[i].append(new)
                jobs.append((new, 0))
            else:
                jobs.append((prompts[i][0], 0))
        eng.grow(jobs)
        added += len(jobs)
    return added


# ---------------------------------------------------------------------------------- DAPO


@ALLOCATORS.register("dapo")
def dapo(ctx: AllocationContext, tasks: list[Task]) -> list[RolloutTree]:
    """DAPO dynamic sampling (docs/trace.md §7.1): groups of G chains; groups whose binary rewards are all equal are
    dropped (their cost stays charged); fresh prompts are drawn for the missing groups, for at most
    `alloc.dapo_rounds` rounds (and, with a token budget, no round starts once it is spent). Returns
    at most B mixed groups; if no group was mixed, the first round's groups (all zero advantage)."""
    eng, G, B = ctx.engine, ctx.rollout.group_size, len(tasks)
    budget = ctx.step_budget(B)
    kept: list[RolloutTree] = []
    first: list[RolloutTree] = []
    batch, rounds, generated = list(tasks), 0, 0
    while batch and rounds < ctx.alloc.dapo_rounds:
        if rounds and budget is not None and eng.cost.gen_tokens >= budget:
            break
        trees = eng.plant(batch, 1, first_group=generated)
        eng.grow([(t, 0) for t in trees for _ in range(G)])
        generated += len(trees)
        rounds += 1
        first = first or trees
        for t in trees:
            t.update_stats()
        kept += [t for t in trees if t.root.mixed][: B - len(kept)]
        batch = ctx.more_tasks(B - len(kept))
    ctx.metrics.update(dapo_rounds=float(rounds), dapo_groups_generated=float(generated),
                       dapo_groups_kept=float(len(kept)))
    return _renumber(kept or first)


# ---------------------------------------------------------------------------------- PCL


@ALLOCATORS.register("pcl", uses_predictor=True)
def pcl(ctx: AllocationContext, tasks: list[Task]) -> list[RolloutTree]:
    """PCL-style filtering (docs/trace.md §7.2): a pool of ceil(pool_factor·B) prompts (the batch first) is scored by the
    predictor; the B with predicted v nearest 0.5 get G chains each. Before the predictor is warm, every
    v is 0.5 and the batch itself is taken (no scoring pass)."""
    B, G = len(tasks), ctx.rollout.group_size
    pool = list(tasks) + ctx.more_tasks(pool_size(ctx.rollout, ctx.alloc) - B)
    roots = ctx.engine.plant(pool, 1)
    v = _root_values(ctx, roots) or [0.5] * len(pool)
    chosen = pcl_select(v, B)
    trees = _renumber([roots[i] for i in chosen])
    ctx.engine.grow([(t, 0) for t in trees for _ in range(G)])
    _top_up(ctx, [[t] for t in trees], [v[i] for i in chosen], ctx.step_budget(B), tree_per_chain=False)
    return trees


# ---------------------------------------------------------------------------------- Knapsack


@ALLOCATORS.register("knapsack")
def knapsack(ctx: AllocationContext, tasks: list[Task]) -> list[RolloutTree]:
    """Knapsack-style counts (docs/trace.md §7.3): B·G root chains split by the Stage 1 DP on each prompt's latest
    empirical success rate (`ctx.prompt_stats`; unseen: 0.5), counts in {0, 2..cap_root}; prompts with
    0 chains are left out this step."""
    B, G, cap = len(tasks), ctx.rollout.group_size, ctx.alloc.cap_root
    rates = [ctx.prompt_stats.get(t.id) for t in tasks]
    counts = knapsack_counts(rates, min(B * G, cap * B), cap, ctx.alloc.knapsack_value)
    active = [i for i, m in enumerate(counts) if m]
    trees = ctx.engine.plant([tasks[i] for i in active], 1)
    ctx.engine.grow([(t, 0) for t, i in zip(trees, active) for _ in range(counts[i])])
    v = [0.5 if rates[i] is None else rates[i] for i in active]
    _top_up(ctx, [[t] for t in trees], v, ctx.step_budget(B), tree_per_chain=False)
    return trees


# ---------------------------------------------------------------------------------- TRACE


def stage1_counts(v: list[float] | None, n_pool: int, budget: int, cap: int, epsilon: float, solver: str,
                  cold_group: int, rng) -> list[int]:
    """Bare rollouts per pool prompt (docs/trace.md §2): Σ = budget (when n_pool·cap allows), each 0 or 2..cap.

    v None (cold start): about budget / cold_group uniformly drawn prompts share the budget evenly.
    Otherwise 2⌊ε·budget/2⌋ rollouts go 2 each to uniformly drawn prompts and the Stage 1 solver
    splits the rest over the other prompts by value; what it cannot place tops up the explored ones."""
    counts = [0] * n_pool
    if v is None:  # cold start: uniform over a random subset
        n = max(1, budget // max(cold_group, 2), math.ceil(budget / cap))
        n = min(n, budget // 2, n_pool)
        chosen = rng.sample(range(n_pool), n)
        for k, i in enumerate(chosen):
            counts[i] = budget // n + (1 if k < budget % n else 0)
        return counts
    n_explore = min(2 * int(epsilon * budget / 2), 2 * n_pool)
    explored = rng.sample(range(n_pool), n_explore // 2)
    for i in explored:
        counts[i] = 2
    rest = [i for i in range(n_pool) if i not in set(explored)]
    left = budget - n_explore
    dp_budget = min(left, cap * len(rest))
    if dp_budget == 1:
        dp_budget = 0
    if dp_budget >= 2:
        for i, m in zip(rest, ROOT_SOLVERS[solver]([v[i] for i in rest], dp_budget, cap)):
            counts[i] = m
    left -= dp_budget
    for i in explored:  # what the solver could not place (budget 1, or rest at cap) tops up explored prompts
        extra = min(left, cap - counts[i])
        counts[i] += extra
        left -= extra
    return counts


def _more_bare(eng, by_prompt: list[list[RolloutTree]], counts: list[int]) -> int:
    """counts[i] more bare rollouts of prompt i, each its own new tree, generated together; returns how many."""
    new = []
    for ts, n in zip(by_prompt, counts):
        if n:
            more = eng.more_trees(ts[0], n, len(ts))
            ts += more
            new += more
    if new:
        eng.grow([(t, 0) for t in new])
    return len(new)


def _stage2(ctx: AllocationContext, by_prompt: list[list[RolloutTree]], totals: list[int],
            root_v: list[float]) -> tuple[list[int], int]:
    """Stage 2 (docs/trace.md §5): prompt i places totals[i] continuations in `alloc.rounds` slices. Each slice scores
    the prompt's non-leaf prefixes (continuations' ones included) whose leaves all share one outcome r
    (prefixes already mixed gain nothing more) with p = Ṽ(prefix), one predictor call per slice, and
    places its share by the exact greedy (at most cap_anchor per prefix). With `alloc.stage2_root` the
    prompt itself is one more anchor (r = the common outcome of all its leaves, p = its root value): a
    continuation there is a new bare rollout. What a slice cannot place carries to the next; returns
    (per-prompt leftover after the last slice, bare rollouts added as root continuations)."""
    a, eng, rng = ctx.alloc, ctx.engine, ctx.rng
    warm = ctx.predictor is not None and ctx.predictor.warm
    carry, restarted = [0] * len(by_prompt), 0
    for r in range(a.rounds):
        anchors: list[list[tuple[RolloutTree | None, int, int]]] = []  # per prompt: (tree | None = root, node, r)
        for ts in by_prompt:
            for t in ts:
                t.update_stats()
            nodes = [(t, n.id, int(n.successes > 0)) for t in ts for n in t.nodes.values()
                     if n.id and not n.done and n.leaves and not n.mixed]
            leaves, wins = sum(t.root.leaves for t in ts), sum(t.root.successes for t in ts)
            if a.stage2_root and leaves and not 0 < wins < leaves:
                nodes.append((None, 0, int(wins > 0)))
            rng.shuffle(nodes)
            anchors.append(nodes)
        prefixes = [NodeRef(t, n) for nodes in anchors for t, n, _ in nodes if t is not None]
        p = iter(ctx.predictor.predict(prefixes) if warm and prefixes else [0.5] * len(prefixes))
        jobs, roots = [], [0] * len(by_prompt)
        for i, nodes in enumerate(anchors):
            k = totals[i] // a.rounds + (r < totals[i] % a.rounds) + carry[i]
            scored = [(o, root_v[i] if t is None else next(p)) for t, _, o in nodes]
            plan = prefix_allocate_greedy(scored, k, a.cap_anchor)
            carry[i] = plan.leftover
            for (t, n, _), K in zip(nodes, plan.counts):
                if t is None:
                    roots[i] += K
                else:
                    jobs += [(t, n)] * K
        if jobs:
            eng.grow(jobs, continuation=True)
        restarted += _more_bare(eng, by_prompt, roots)
    return carry, restarted


def _check_trace(r: RolloutConfig, a: AllocConfig) -> str | None:
    m, pool = root_rollouts(r, a), pool_size(r, a)
    if pool * a.cap_root < m:
        return (f"trace: {m} bare rollouts cannot be split over a pool of {pool} prompts with "
                f"alloc.cap_root={a.cap_root}; raise alloc.pool_factor or alloc.cap_root")
    return None


@ALLOCATORS.register("trace", uses_predictor=True, makes_trees=True, check=_check_trace)
def trace(ctx: AllocationContext, tasks: list[Task]) -> list[RolloutTree]:
    """TRACE (docs/trace.md §1–§5). Stage 1: M bare rollouts over a pool of ceil(pool_factor·B) prompts (the batch
    first) by the exact DP on predicted root values (ε share to random pool prompts); each bare rollout
    seeds its own tree. Stage 2 (`_stage2`), per prompt: m_i·N continuations in `alloc.rounds` slices
    over its prefixes whose leaves share one outcome, by the exact greedy on q = r·p + (1 − r)(1 − p);
    what finds no prefix becomes extra bare rollouts of that prompt. Cold start (predictor not warm):
    uniform Stage 1 and p ≡ 0.5 in Stage 2 (anchors shuffled, so ties are random)."""
    a, eng, rng, B = ctx.alloc, ctx.engine, ctx.rng, len(tasks)
    M = root_rollouts(ctx.rollout, a)
    pool = list(tasks) + ctx.more_tasks(pool_size(ctx.rollout, a) - B)
    roots = eng.plant(pool, 1)
    v = _root_values(ctx, roots)
    counts = stage1_counts(v, len(pool), M, a.cap_root, a.epsilon, a.root_solver, ctx.rollout.group_size, rng)
    active = [i for i, m in enumerate(counts) if m]
    trees = eng.plant([pool[i] for i in active], [counts[i] for i in active])
    by_prompt: list[list[RolloutTree]] = [[] for _ in active]
    for t in trees:
        by_prompt[t.group].append(t)
        if 0 in roots[active[t.group]].hidden:
            t.hidden[0] = roots[active[t.group]].hidden[0]
    eng.grow([(t, 0) for t in trees])

    root_v = [0.5] * len(active) if v is None else [v[i] for i in active]
    leftover, restarts = _stage2(ctx, by_prompt, [counts[i] * a.continuations for i in active], root_v)
    _more_bare(eng, by_prompt, leftover)
    topped = _top_up(ctx, by_prompt, root_v, ctx.step_budget(B), tree_per_chain=True)
    ctx.metrics.update(stage2_leftover=float(sum(leftover)), stage2_restarts=float(restarts), budget_chains=float(topped),
                       explore_rollouts=float(min(2 * int(a.epsilon * M / 2), 2 * len(pool)) if v is not None else 0))
    return [t for ts in by_prompt for t in ts]
