"""Allocators that decide how many rollouts each prompt gets (docs/trace.md): DAPO dynamic
sampling, PCL-style filtering, Knapsack-style counts and TRACE (Stage 1 root counts on predicted
values, Stage 2 continuations on predicted prefix values).

All of them grow trees only through the step's `Meter` (`tracerl.allocate.budget`), so every
generated token (discarded groups included) is charged. With `rollout.token_budget` set, the step
spends token_budget × (prompts in the batch) generated tokens, within one trajectory: the plan runs
in budget-sized waves and stops once the budget is met; what it leaves goes to extra root chains, to
the prompts whose contrast gains most from one more chain, in waves sized from what is left (at most
`rollout.max_budget_waves` waves added by the budget).
"""

from __future__ import annotations

import heapq
import math
from typing import Sequence

from tracerl.allocate.basic import ALLOCATORS, AllocationContext, grown, round_robin
from tracerl.allocate.budget import Meter
from tracerl.allocate.engine import NodeRef
from tracerl.allocate.solvers import (ROOT_SOLVERS, contrast, knapsack_counts, pcl_select, prefix_allocate_costed)
from tracerl.config import AllocConfig, RolloutConfig, pool_size, root_rollouts
from tracerl.envs.base import Task
from tracerl.tree import RolloutTree


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


def _new_tree(ctx: AllocationContext, trees: list[RolloutTree]):
    """A maker of one more tree of the prompt of `trees` (appended to it when made, i.e. when its job runs)."""
    def make() -> RolloutTree:
        new = ctx.engine.more_trees(trees[0], 1, len(trees))[0]
        trees.append(new)
        return new
    return make


class TopUp:
    """With a budget: the root chains that fill the step's budget once the plan is spent, each to the prompt
    whose contrast gains most (`Meter.run`'s `top_up`, or `Meter.fill`'s `make`). `prompts[i]` are prompt
    i's trees: a new chain is a new tree (`tree_per_chain`) or one more root child of the first.
    `planned[i]`: prompt i's chains the plan still has to run (counted as made); `first`: prompts
    (indices, repeats allowed) whose chains come before any chosen by contrast (TRACE's Stage 2
    leftover). `made` / `made_first` count the chains handed out."""

    def __init__(self, ctx: AllocationContext, prompts: list[list[RolloutTree]], v: list[float], tree_per_chain: bool,
                 planned: Sequence[int] | None = None, first: Sequence[int] = ()):
        self.ctx, self.prompts, self.tree_per_chain = ctx, prompts, tree_per_chain
        self.idx = [i for i, ts in enumerate(prompts) if ts and (tree_per_chain or not ts[0].root.done)]
        self.v = [v[i] for i in self.idx]
        self.counts = [(len(prompts[i]) if tree_per_chain else len(prompts[i][0].root.children))
                       + (planned[i] if planned else 0) for i in self.idx]
        pos = {i: k for k, i in enumerate(self.idx)}
        self.queue = [pos[i] for i in first if i in pos]
        self.made = self.made_first = 0

    def __call__(self, n: int) -> list:
        picks = self.queue[:n]
        del self.queue[:n]
        self.made_first += len(picks)
        for k in picks:
            self.counts[k] += 1
        for k in _marginal_picks(self.counts, self.v, n - len(picks), self.ctx.alloc.cap_root):
            self.counts[k] += 1
            picks.append(k)
        self.made += len(picks)
        ts = [self.prompts[self.idx[k]] for k in picks]
        return [(_new_tree(self.ctx, t), 0) if self.tree_per_chain else (t[0], 0) for t in ts]


# ---------------------------------------------------------------------------------- DAPO


@ALLOCATORS.register("dapo")
def dapo(ctx: AllocationContext, tasks: list[Task]) -> list[RolloutTree]:
    """DAPO dynamic sampling (docs/trace.md §7.1): groups of G chains; groups whose binary rewards are all equal are
    dropped (their cost stays charged); fresh prompts are drawn for the missing groups, for at most
    `alloc.dapo_rounds` rounds. With a token budget, each round runs in budget-sized waves (every
    group's j-th chain before any group's (j+1)-th) and nothing runs once the budget is met, so the last
    round's groups may be one chain short. Returns at most B mixed groups; if no group was mixed, the
    first round's groups (all zero advantage)."""
    eng, G, B = ctx.engine, ctx.rollout.group_size, len(tasks)
    meter = ctx.meter(B)
    kept: list[RolloutTree] = []
    first: list[RolloutTree] = []
    batch, rounds, generated, next_group = list(tasks), 0, 0, 0
    while batch and rounds < ctx.alloc.dapo_rounds and not meter.exhausted:
        trees = eng.plant(batch, 1, first_group=next_group)
        next_group += len(trees)
        meter.run(round_robin(trees, G))
        trees = [t for t in trees if len(t.nodes) > 1 or t.root.done]
        generated += len(trees)
        rounds += 1
        first = first or trees
        for t in trees:
            t.update_stats()
        kept += [t for t in trees if t.root.mixed][: B - len(kept)]
        if meter.exhausted:
            break
        batch = ctx.more_tasks(B - len(kept))
    ctx.metrics.update(dapo_rounds=float(rounds), dapo_groups_generated=float(generated),
                       dapo_groups_kept=float(len(kept)))
    meter.finish(ctx.metrics)
    return grown(kept or first)


# ---------------------------------------------------------------------------------- PCL


@ALLOCATORS.register("pcl", uses_predictor=True)
def pcl(ctx: AllocationContext, tasks: list[Task]) -> list[RolloutTree]:
    """PCL-style filtering (docs/trace.md §7.2): a pool of ceil(pool_factor·B) prompts (the batch first) is scored by the
    predictor; the B with predicted v nearest 0.5 get G chains each. Before the predictor is warm, every
    v is 0.5 and the batch itself is taken (no scoring pass)."""
    B, G = len(tasks), ctx.rollout.group_size
    meter = ctx.meter(B)
    pool = list(tasks) + ctx.more_tasks(pool_size(ctx.rollout, ctx.alloc) - B)
    roots = ctx.engine.plant(pool, 1)
    v = _root_values(ctx, roots) or [0.5] * len(pool)
    chosen = pcl_select(v, B)
    trees = [roots[i] for i in chosen]
    for g, t in enumerate(trees):
        t.group = g
    top_up = TopUp(ctx, [[t] for t in trees], [v[i] for i in chosen], tree_per_chain=False, planned=[G] * len(trees))
    meter.run(round_robin(trees, G), top_up=top_up)
    meter.finish(ctx.metrics)
    return grown(trees)


# ---------------------------------------------------------------------------------- Knapsack


@ALLOCATORS.register("knapsack")
def knapsack(ctx: AllocationContext, tasks: list[Task]) -> list[RolloutTree]:
    """Knapsack-style counts (docs/trace.md §7.3): B·G root chains split by the Stage 1 DP on each prompt's latest
    empirical success rate (`ctx.prompt_stats`; unseen: 0.5), counts in {0, 2..cap_root}; prompts with
    0 chains are left out this step."""
    B, G, cap = len(tasks), ctx.rollout.group_size, ctx.alloc.cap_root
    meter = ctx.meter(B)
    rates = [ctx.prompt_stats.get(t.id) for t in tasks]
    counts = knapsack_counts(rates, min(B * G, cap * B), cap, ctx.alloc.knapsack_value)
    active = [i for i, m in enumerate(counts) if m]
    trees = ctx.engine.plant([tasks[i] for i in active], 1)
    v = [0.5 if rates[i] is None else rates[i] for i in active]
    top_up = TopUp(ctx, [[t] for t in trees], v, tree_per_chain=False, planned=[counts[i] for i in active])
    meter.run(round_robin(trees, [counts[i] for i in active]), top_up=top_up)
    meter.finish(ctx.metrics)
    return grown(trees)


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


def _bare(meter: Meter, ctx: AllocationContext, by_prompt: list[list[RolloutTree]], counts: list[int]) -> list[int]:
    """counts[i] more bare rollouts of prompt i, each its own new tree (made only if its job runs), in
    rounds over the prompts; returns the tokens each prompt spent on them."""
    jobs, owner = [], []
    for j in range(max(counts, default=0)):
        for i, n in enumerate(counts):
            if n > j and by_prompt[i]:
                jobs.append((_new_tree(ctx, by_prompt[i]), 0))
                owner.append(i)
    spent = [0] * len(by_prompt)
    for i, tokens in zip(owner, meter.run(jobs)):
        spent[i] += tokens
    return spent


def _stage2(ctx: AllocationContext, meter: Meter, by_prompt: list[list[RolloutTree]], budgets: list[float],
            root_v: list[float], chain_tokens: list[float]) -> tuple[list[float], int, TopUp | None]:
    """Stage 2 (docs/trace.md §5): prompt i spends budgets[i] generated tokens (m_i·N continuations of f
    chain-lengths each) in `alloc.rounds` slices. Each slice scores the prompt's non-leaf prefixes
    (continuations' ones included) whose leaves all share one outcome r (prefixes already mixed gain
    nothing more) with p = Ṽ(prefix), one predictor call per slice, and places an equal share of what the
    prompt has left, in continuation units of f·chain_tokens[i] tokens, by the greedy on gain per unit
    (at most cap_anchor per prefix). With `alloc.stage2_root` the prompt itself is one more anchor (r =
    the common outcome of all its leaves, p = its root value): a continuation there is a root restart, a
    new bare rollout, which costs a whole chain, 1/f units. Each slice charges the tokens its jobs
    actually generated, so what a slice leaves or overspends moves to the next. Returns (per-prompt
    tokens left after the last slice, root restarts, the top-up or None).

    Each slice is one generation call (its continuations and root restarts together; under a budget, in
    the budget's waves). Under a budget the last slice also takes what it cannot place (bare chains of
    its prompt, one per chain's worth) and the budget's top-up (`TopUp`) into its call: its last wave
    is filled with them, and top-up waves follow until the budget is met."""
    a, rng = ctx.alloc, ctx.rng
    f = meter.f
    warm = ctx.predictor is not None and ctx.predictor.warm
    spent, restarted, top_up = [0.0] * len(by_prompt), 0, None
    for r in range(a.rounds):
        if meter.exhausted:
            break
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
        planned = []  # (rank in its prompt's greedy order, prompt, job, is a continuation)
        restarts, unplaced = [0] * len(by_prompt), [0] * len(by_prompt)  # per prompt: planned, chains' worth left
        for i, nodes in enumerate(anchors):
            scored = [(o, root_v[i] if t is None else next(p)) for t, _, o in nodes]
            units = max(budgets[i] - spent[i], 0.0) / (a.rounds - r) / (f * chain_tokens[i])
            plan = prefix_allocate_costed(scored, units, a.cap_anchor, [1 / f if t is None else 1.0 for t, _, _ in nodes])
            unplaced[i] = max(round(plan.leftover * f), 0) if by_prompt[i] else 0  # a chain is 1/f units
            for rank, j in enumerate(plan.order):
                t, n, _ = nodes[j]
                job = (_new_tree(ctx, by_prompt[i]), 0) if t is None else (t, n)  # a root restart: a new tree
                planned.append((rank, i, job, t is not None))
                restarts[i] += t is None
        # under a budget cut, every prompt's best placements first
        planned.sort(key=lambda x: x[0])
        if meter.budget is not None and r == a.rounds - 1:
            first = [i for j in range(max(unplaced, default=0)) for i, k in enumerate(unplaced) if k > j]
            top_up = TopUp(ctx, by_prompt, root_v, tree_per_chain=True, planned=restarts, first=first)
        tokens = meter.run([job for _, _, job, _ in planned], [cont for *_, cont in planned],
                           top_up=top_up if r == a.rounds - 1 else None)
        for (_, i, _, cont), n_tokens in zip(planned, tokens):
            spent[i] += n_tokens
            restarted += not cont
    return [b - s for b, s in zip(budgets, spent)], restarted, top_up


def trace_root_rollouts(r: RolloutConfig, a: AllocConfig, prompts: int, pool: int, f: float,
                        chain_tokens: float | None, budget: int | None) -> int:
    """M, the step's bare rollouts: alloc.root_rollouts if given; else sized so the expected cost
    M·(1 + N·f) chain-lengths matches the step's budget (when the running mean chain length is known),
    or B·G chains; f is the running estimate. Between 2 and pool·cap_root."""
    if a.root_rollouts is not None:
        m = a.root_rollouts
    elif budget is not None and chain_tokens:
        m = round(budget / (chain_tokens * (1 + a.continuations * f)))
    else:
        m = round(prompts * r.group_size / (1 + a.continuations * f))
    return min(max(2, m), pool * a.cap_root)


def _check_trace(r: RolloutConfig, a: AllocConfig) -> str | None:
    m, pool = root_rollouts(r, a), pool_size(r, a)
    if pool * a.cap_root < m:
        return (f"trace: {m} bare rollouts cannot be split over a pool of {pool} prompts with "
                f"alloc.cap_root={a.cap_root}; raise alloc.pool_factor or alloc.cap_root")
    return None


@ALLOCATORS.register("trace", uses_predictor=True, makes_trees=True, check=_check_trace)
def trace(ctx: AllocationContext, tasks: list[Task]) -> list[RolloutTree]:
    """TRACE (docs/trace.md §1–§5). Stage 1: M bare rollouts (`trace_root_rollouts`, sized with the
    running f) over a pool of ceil(pool_factor·B) prompts (the batch first) by the exact DP on predicted
    root values (ε share to random pool prompts); each bare rollout seeds its own tree. Stage 2
    (`_stage2`), per prompt: m_i·N continuations' worth of tokens, m_i·N·f × the prompt's measured mean
    chain tokens, in `alloc.rounds` slices over its prefixes whose leaves share one outcome, by the
    greedy on q = r·p + (1 − r)(1 − p) per unit of cost (a root restart costs a chain); what finds no
    prefix becomes extra bare rollouts of that prompt (one per chain's worth). Cold start (predictor
    not warm): uniform Stage 1 and p ≡ 0.5 in Stage 2 (anchors shuffled, so ties are random). The
    step's measured f then updates the running estimate (`CostModel`)."""
    a, eng, rng, B = ctx.alloc, ctx.engine, ctx.rng, len(tasks)
    meter = ctx.meter(B)
    f = meter.f
    pool = list(tasks) + ctx.more_tasks(pool_size(ctx.rollout, a) - B)
    M = trace_root_rollouts(ctx.rollout, a, B, len(pool), f, ctx.costs.chain_tokens, meter.budget)
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
    stage1 = meter.run(sorted(((t, 0) for t in trees), key=lambda j: j[0].index))  # every prompt's first first
    by_prompt = [[t for t in ts if len(t.nodes) > 1 or t.root.done] for ts in by_prompt]
    chain_tokens = [max(sum(t.gen_tokens() for t in ts) / len(ts), 1.0) if ts else 1.0 for ts in by_prompt]
    budgets = [len(ts) * a.continuations * f * c for ts, c in zip(by_prompt, chain_tokens)]

    root_v = [0.5] * len(active) if v is None else [v[i] for i in active]
    left, restarts, top_up = _stage2(ctx, meter, by_prompt, budgets, root_v, chain_tokens)
    if meter.budget is None:  # what Stage 2 left becomes bare rollouts of its prompt, one per chain's worth
        before = sum(len(ts) for ts in by_prompt)
        _bare(meter, ctx, by_prompt, [max(round(x / c), 0) if ts else 0 for x, c, ts in zip(left, chain_tokens, by_prompt)])
        leftover, topped = sum(len(ts) for ts in by_prompt) - before, 0
    else:  # under a budget the last Stage 2 slice ran them with the top-up
        leftover, topped = (top_up.made_first, top_up.made - top_up.made_first) if top_up else (0, 0)
    ctx.metrics.update(stage1_rollouts=float(len(stage1)), stage2_restarts=float(restarts),
                       stage2_leftover=float(leftover), budget_chains=float(topped), f_planned=f,
                       explore_rollouts=float(min(2 * int(a.epsilon * M / 2), 2 * len(pool)) if v is not None else 0))
    meter.finish(ctx.metrics)
    return grown([t for ts in by_prompt for t in ts])
