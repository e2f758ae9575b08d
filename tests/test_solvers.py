"""TRACE budget solvers against brute force on small instances (docs/trace.md §2, §5, §7)."""

from __future__ import annotations

import itertools
import random

import pytest

from tracerl.allocate.solvers import (BudgetError, contrast, knapsack_counts, pcl_select, prefix_allocate_greedy,
                                      repeat_chance, root_allocate_dp, root_allocate_greedy)

# values that create exact ties (0, 1, mirrored pairs) next to generic ones
TIE_VALUES = [0.0, 1.0, 0.5, 0.3, 0.7, 0.9]


def _key(v, m):
    """The DP's lexicographic objective: contrast, then rollouts nearer 0.5, then more prompts."""
    return (sum(contrast(x, k) for x, k in zip(v, m)), -sum(k * abs(x - 0.5) for x, k in zip(v, m)),
            sum(k > 0 for k in m))


def _brute_root(v, budget, cap):
    options = [0, *range(2, cap + 1)]
    feasible = [m for m in itertools.product(options, repeat=len(v)) if sum(m) == budget]
    return max(feasible, key=lambda m: tuple(round(x, 9) for x in _key(v, m))) if feasible else None


def _instances(n, seed):
    rng = random.Random(seed)
    for _ in range(n):
        p, cap, budget = rng.randint(1, 4), rng.randint(2, 6), rng.randint(0, 12)
        pick = (lambda: rng.choice(TIE_VALUES)) if rng.random() < 0.4 else rng.random
        yield [pick() for _ in range(p)], budget, cap


def test_contrast_values():
    assert contrast(0.5, 0) == contrast(0.5, 1) == 0.0
    assert contrast(0.3, 2) == pytest.approx(2 * 0.3 * 0.7)
    assert contrast(0.5, 3) == pytest.approx(0.75)
    assert contrast(0.0, 8) == contrast(1.0, 8) == 0.0


def test_root_dp_equals_brute_force_including_ties():
    checked = 0
    for v, budget, cap in _instances(400, seed=1):
        best = _brute_root(v, budget, cap)
        if best is None:
            with pytest.raises(BudgetError):
                root_allocate_dp(v, budget, cap)
            continue
        m = root_allocate_dp(v, budget, cap)
        assert sum(m) == budget and all(k == 0 or 2 <= k <= cap for k in m)
        got, want = _key(v, m), _key(v, best)
        assert got[0] == pytest.approx(want[0], abs=1e-9) and got[1] == pytest.approx(want[1], abs=1e-9)
        assert got[2] == want[2], (v, budget, cap, m, best)
        checked += 1
    assert checked > 200


def test_root_greedy_is_feasible_and_never_beats_dp():
    for v, budget, cap in _instances(300, seed=2):
        try:
            exact = root_allocate_dp(v, budget, cap)
        except BudgetError:
            with pytest.raises(BudgetError):
                root_allocate_greedy(v, budget, cap)
            continue
        m = root_allocate_greedy(v, budget, cap)
        assert sum(m) == budget and all(k == 0 or 2 <= k <= cap for k in m)
        assert _key(v, m)[0] <= _key(v, exact)[0] + 1e-12


def test_tie_breaks_prefer_nearer_half_then_more_prompts_then_earlier():
    assert root_allocate_dp([1.0, 0.0, 1.0], 6, 6) == [2, 2, 2]  # all zero contrast: more prompts
    assert root_allocate_dp([0.0, 1e-11, 1.0], 2, 4) == [0, 2, 0]  # tied contrast: nearer 0.5
    assert root_allocate_dp([0.3, 0.7], 3, 4) == [3, 0]  # mirrored values: the earlier prompt


@pytest.mark.parametrize("v,budget,cap", [([0.5], 1, 16), ([0.5], 3, 2), ([0.5, 0.5], 9, 4), ([0.5], 5, 1)])
def test_infeasible_budgets_raise_one_line(v, budget, cap):
    with pytest.raises(BudgetError) as e:
        root_allocate_dp(v, budget, cap)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


def test_root_dp_is_fast_at_full_size():
    import time

    rng = random.Random(0)
    v = [rng.random() for _ in range(512)]
    t0 = time.perf_counter()
    m = root_allocate_dp(v, 1024, 16)
    assert sum(m) == 1024 and time.perf_counter() - t0 < 2.0  # ~0.2 s alone; loose for a busy machine


def _brute_prefix(anchors, budget, cap):
    total = min(budget, cap * len(anchors))
    qs = [repeat_chance(r, p) for r, p in anchors]
    best = max((k for k in itertools.product(range(cap + 1), repeat=len(anchors)) if sum(k) == total),
               key=lambda k: sum(1 - q ** x for q, x in zip(qs, k)))
    return sum(1 - q ** x for q, x in zip(qs, best))


def test_prefix_greedy_equals_brute_force_and_spends_what_fits():
    rng = random.Random(3)
    for _ in range(300):
        n, cap, budget = rng.randint(0, 4), rng.randint(0, 4), rng.randint(0, 12)
        anchors = [(rng.randint(0, 1), rng.choice([rng.random(), 0.0, 1.0, 0.5])) for _ in range(n)]
        counts, leftover = prefix_allocate_greedy(anchors, budget, cap)
        assert all(0 <= k <= cap for k in counts) and len(counts) == n
        assert sum(counts) == min(budget, cap * n) and leftover == budget - sum(counts)
        qs = [repeat_chance(r, p) for r, p in anchors]
        got = sum(1 - q ** k for q, k in zip(qs, counts))
        assert got == pytest.approx(_brute_prefix(anchors, budget, cap), abs=1e-12)


def test_prefix_greedy_expands_surprising_chains_first():
    # a failed chain whose prefix looked promising, a success that was expected, a success that looked unlikely
    counts, leftover = prefix_allocate_greedy([(0, 0.9), (1, 0.9), (1, 0.1)], 2, cap=4)
    assert counts == [1, 0, 1] and leftover == 0
    assert repeat_chance(1, 1.0) == pytest.approx(0.98)  # p is clipped to [0.02, 0.98]


def test_knapsack_and_pcl():
    # unseen prompts count as 0.5; solved and unsolved ones get nothing while others can use the budget
    assert knapsack_counts([None, 1.0, 0.0, 0.5], 8, cap=4) == [4, 0, 0, 4]
    assert sum(knapsack_counts([0.2, 0.6, 0.9], 7, cap=4, value="ig")) == 7
    with pytest.raises(BudgetError):
        knapsack_counts([0.5], 4, value="entropy")
    assert pcl_select([0.1, 0.55, 0.9, 0.45, 0.5], 3) == [1, 3, 4]
