"""Budget solvers of TRACE allocation (docs/trace.md §2, §5) and of the Knapsack / PCL baselines (docs/trace.md §7.2–§7.3).

Pure functions on plain floats: no models, no trees, no torch.

* Stage 1, `root_allocate_dp`: split M bare rollouts over a pool of prompts, m_i ∈ {0} ∪ {2..cap},
  Σ m_i = M exactly, maximising Σ contrast(v_i, m_i), the expected number of prompts whose m_i
  leaves hold both outcomes. `root_allocate_greedy` is the cheaper, not always optimal option.
* Stage 2, `prefix_allocate_greedy`: split a prompt's continuations over the prefixes of its bare
  rollouts, maximising the expected number of prefixes whose continuations disagree with the chain.
* `knapsack_counts` (Stage 1 on empirical success rates) and `pcl_select` (prompts nearest 0.5).
"""

from __future__ import annotations

import heapq
from typing import Callable, NamedTuple, Sequence

import numpy as np

from tracerl.errors import TracerlError

P_CLIP = (0.02, 0.98)  # docs/trace.md §5: predicted prefix values are clipped before computing q
_TOL = 1e-9  # contrast sums closer than this count as tied (float sums in another order)
_TOL_CLOSE = 1e-12  # the same for the tie-break Σ m·|v − 0.5|


class BudgetError(TracerlError, ValueError):
    """A budget that cannot be split under the constraints (one line: what to change)."""


def contrast(v: float, m: int) -> float:
    """Chance that m independent outcomes with success probability v are not all equal (0 for m < 2)."""
    return 1.0 - v ** m - (1.0 - v) ** m if m >= 2 else 0.0


def _check_inputs(v: Sequence[float], budget: int, cap: int) -> None:
    if cap < 2:
        raise BudgetError(f"cap must be ≥ 2 (a prompt gets 0 or 2..cap rollouts), got {cap}")
    if budget < 0:
        raise BudgetError(f"budget must be ≥ 0, got {budget}")
    bad = [x for x in v if not 0.0 <= x <= 1.0]
    if bad:
        raise BudgetError(f"success probabilities must lie in [0, 1], got {bad[:3]}")
    n = len(v)
    feasible = budget == 0 or (2 <= budget <= n * cap and (cap >= 3 or budget % 2 == 0))
    if not feasible:
        raise BudgetError(f"cannot split {budget} rollouts over {n} prompt(s) with counts in {{0, 2..{cap}}}: "
                          f"need budget 0 or 2..{n * cap}{'' if cap >= 3 else ' and even'}; "
                          f"change the budget, the pool size or the cap")


def _choices(cap: int) -> np.ndarray:
    return np.array([0, *range(2, cap + 1)])


def _lexmax_dp(values: np.ndarray, dist: np.ndarray, budget: int, cap: int) -> list[int]:
    """Exact DP over (prompt, rollouts spent) for values[i, k] = value of giving prompt i choices[k].

    The objective is lexicographic and additive over prompts, so the DP stays exact:
      1. Σ value (within _TOL: ties arise when v are 0, 1 or mirrored around 0.5),
      2. smallest Σ m_i·|v_i − 0.5| (within _TOL_CLOSE): rollouts sit on prompts nearer 0.5,
      3. most prompts with m_i > 0,
      4. what is still tied keeps the smallest count of the later prompt, i.e. favours earlier prompts.
    Shapes: values (P, n_choices), dist (P,); the inner step is vectorised over (n_choices, budget+1)."""
    choices = _choices(cap)
    n_prompts, width = len(dist), budget + 1
    # idx[k, b] points into a state array padded with cap infeasible entries: the state b − choices[k]
    idx = cap - choices[:, None] + np.arange(width)[None, :]
    pad = np.full(cap, -np.inf)
    best = np.full(width, -np.inf)
    best[0] = 0.0
    closeness = np.zeros(width)  # −Σ m·dist, maximised
    active = np.zeros(width)
    pick = np.zeros((n_prompts, width), dtype=np.int16)
    cols = np.arange(width)
    for i in range(n_prompts):
        cand = np.concatenate([pad, best])[idx] + values[i][:, None]
        cand_close = np.concatenate([pad, closeness])[idx] - choices[:, None] * dist[i]
        cand_active = np.concatenate([pad, active])[idx] + (choices > 0)[:, None]
        ok = cand >= cand.max(axis=0) - _TOL
        close = np.where(ok, cand_close, -np.inf)
        ok &= close >= close.max(axis=0) - _TOL_CLOSE
        act = np.where(ok, cand_active, -1.0)
        ok &= act == act.max(axis=0)
        k = ok.argmax(axis=0)  # first tied choice: the smallest count
        best, closeness, active = cand[k, cols], cand_close[k, cols], cand_active[k, cols]
        pick[i] = k
    if not np.isfinite(best[budget]):  # only reachable if _check_inputs missed a case
        raise BudgetError(f"no split of {budget} rollouts over {n_prompts} prompts with cap {cap}")
    counts, b = [0] * n_prompts, budget
    for i in range(n_prompts - 1, -1, -1):
        counts[i] = int(choices[pick[i, b]])
        b -= counts[i]
    return counts


def _value_table(v: Sequence[float], cap: int, weight: Callable[[float], float] = lambda _: 1.0) -> np.ndarray:
    choices = _choices(cap)
    return np.array([[weight(x) * contrast(x, int(m)) for m in choices] for x in v]).reshape(len(v), len(choices))


def root_allocate_dp(v: Sequence[float], budget: int, cap: int = 16) -> list[int]:
    """Stage 1 (docs/trace.md §2), exact: rollouts per prompt m_i ∈ {0} ∪ {2..cap}, Σ m_i = budget, maximising
    Σ contrast(v_i, m_i). Ties: see `_lexmax_dp`. O(P·budget·cap) in numpy (P=512, M=1024: ~0.1 s).
    Raises BudgetError (a ValueError) if no split exists (budget 1, odd with cap 2, above P·cap)."""
    _check_inputs(v, budget, cap)
    dist = np.abs(np.asarray(v, dtype=float) - 0.5)
    return _lexmax_dp(_value_table(v, cap), dist, budget, cap)


def root_allocate_greedy(v: Sequence[float], budget: int, cap: int = 16) -> list[int]:
    """Stage 1 option `greedy` (docs/trace.md §2): per prompt an activation item (2 rollouts, value 2v(1−v)),
    then unit increments; items taken by value per rollout (ties: nearer 0.5, then earlier prompt).
    Spends the budget exactly like the DP (a last odd rollout is placed by moving one rollout from a
    prompt with ≥ 3 to activate a new one); never better than `root_allocate_dp`."""
    _check_inputs(v, budget, cap)
    counts = [0] * len(v)
    heap = [(-contrast(x, 2) / 2, abs(x - 0.5), i, 2) for i, x in enumerate(v)]
    heapq.heapify(heap)
    left = budget
    while left > 0 and heap:
        _, _, i, cost = heapq.heappop(heap)
        if cost > left:
            continue  # an activation with one rollout left: dropped, later items may still fit
        counts[i] += cost
        left -= cost
        if counts[i] < cap:
            gain = contrast(v[i], counts[i] + 1) - contrast(v[i], counts[i])
            heapq.heappush(heap, (-gain, abs(v[i] - 0.5), i, 1))
    if left:  # one rollout left, every active prompt at cap: 3+ → one less, a new prompt gets 2
        donor = next(i for i, m in enumerate(counts) if m >= 3)
        new = min((i for i, m in enumerate(counts) if m == 0), key=lambda i: (-contrast(v[i], 2), abs(v[i] - 0.5), i))
        counts[donor] -= 1
        counts[new] = 2
    return counts


ROOT_SOLVERS: dict[str, Callable[..., list[int]]] = {"dp": root_allocate_dp, "greedy": root_allocate_greedy}


class Expansion(NamedTuple):
    counts: list[int]  # continuations per anchor (K_jt)
    leftover: int  # budget that found no anchor (cap·anchors < budget): becomes root chains (docs/trace.md §5)


def repeat_chance(r: int, p: float) -> float:
    """q = r·p + (1 − r)(1 − p): chance that one continuation repeats the chain's outcome r (p clipped)."""
    p = min(max(p, P_CLIP[0]), P_CLIP[1])
    return r * p + (1 - r) * (1 - p)


def prefix_allocate_greedy(anchors: Sequence[tuple[int, float]], budget: int, cap: int = 4) -> Expansion:
    """Stage 2 (docs/trace.md §5): anchors are (r, p) pairs, r the chain's outcome, p the predicted value of the prefix.
    Maximises Σ 1 − q^K over K_j ∈ [0, cap], Σ K_j = min(budget, cap·len(anchors)). A max-heap on the
    gain q^(k−1)(1 − q) of the k-th continuation is exact: the objective is separable and concave.
    Ties go to the earlier anchor."""
    if budget < 0 or cap < 0:
        raise BudgetError(f"budget and cap must be ≥ 0, got budget={budget}, cap={cap}")
    qs = [repeat_chance(r, p) for r, p in anchors]
    counts = [0] * len(qs)
    heap = [(-(1 - q), j) for j, q in enumerate(qs)] if cap else []
    heapq.heapify(heap)
    left = budget
    while left and heap:
        _, j = heapq.heappop(heap)
        counts[j] += 1
        left -= 1
        if counts[j] < cap:
            heapq.heappush(heap, (-(qs[j] ** counts[j]) * (1 - qs[j]), j))
    return Expansion(counts, left)


class CostedExpansion(NamedTuple):
    counts: list[int]  # continuations per anchor
    order: list[int]  # the anchor of each planned continuation, best gain per unit of budget first
    leftover: float  # budget units placed nowhere (every anchor at cap, or too dear for what is left)


def prefix_allocate_costed(anchors: Sequence[tuple[int, float]], budget: float, cap: int,
                           costs: Sequence[float]) -> CostedExpansion:
    """Stage 2 with a cost per anchor (docs/trace.md §5): anchor j's continuations cost costs[j] budget
    units each (1 for a prefix continuation; 1/f for a root restart, a whole bare chain). The k-th
    continuation at anchor j gains q^(k−1)(1 − q); continuations are taken by gain per unit (ties: the
    earlier anchor) while they fit, a budget rounded to the nearest unit (an item fits if its cost is at
    most what is left + 0.5). With unit costs this is `prefix_allocate_greedy` on round(budget)."""
    if cap < 0 or len(costs) != len(anchors) or any(c <= 0 for c in costs):
        raise BudgetError(f"need cap ≥ 0 and one positive cost per anchor, got cap={cap}, costs={list(costs)[:4]}")
    qs = [repeat_chance(r, p) for r, p in anchors]
    counts, order = [0] * len(qs), []
    heap = [(-(1 - q) / c, j) for j, (q, c) in enumerate(zip(qs, costs))] if cap else []
    heapq.heapify(heap)
    left = max(float(budget), 0.0)
    while heap:
        _, j = heapq.heappop(heap)
        if costs[j] > left + 0.5:
            continue  # too dear for what is left; its later continuations cost the same
        counts[j] += 1
        order.append(j)
        left -= costs[j]
        if counts[j] < cap:
            heapq.heappush(heap, (-(qs[j] ** counts[j]) * (1 - qs[j]) / costs[j], j))
    return CostedExpansion(counts, order, left)


def expansion_gains(anchors: Sequence[tuple[int, float]], counts: Sequence[int]) -> list[tuple[float, int]]:
    """(gain, anchor) of every planned continuation, the k-th at anchor j gaining q^(k−1)(1 − q)."""
    out = []
    for j, ((r, p), k) in enumerate(zip(anchors, counts)):
        q = repeat_chance(r, p)
        out += [(q ** i * (1 - q), j) for i in range(k)]
    return out


def knapsack_counts(success_rates: Sequence[float | None], budget: int, cap: int = 16,
                    value: str = "contrast") -> list[int]:
    """Knapsack-style counts (docs/trace.md §7.3, arXiv 2509.25849): the Stage 1 DP on each prompt's latest empirical
    success rate (None = unseen → 0.5); `value = "ig"` weights a prompt's contrast by p(1 − p)²."""
    if value not in ("contrast", "ig"):
        raise BudgetError(f"knapsack value must be 'contrast' or 'ig', got {value!r}")
    v = [0.5 if p is None else p for p in success_rates]
    _check_inputs(v, budget, cap)
    weight = (lambda p: p * (1 - p) ** 2) if value == "ig" else (lambda _: 1.0)
    dist = np.abs(np.asarray(v, dtype=float) - 0.5)
    return _lexmax_dp(_value_table(v, cap, weight), dist, budget, cap)


def pcl_select(v: Sequence[float], k: int) -> list[int]:
    """PCL-style filtering (docs/trace.md §7.2, arXiv 2510.01135): indices of the k prompts with the smallest
    |v − 0.5| (ties: earlier prompt), in pool order."""
    order = sorted(range(len(v)), key=lambda i: (abs(v[i] - 0.5), i))
    return sorted(order[:k])
