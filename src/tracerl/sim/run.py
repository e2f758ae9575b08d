"""Run simulator allocators at equal token budget and measure the contrast they buy.

Per batch (METHODS.md §1), over every tree an allocator generated (DAPO: before filtering):
* effective_ratio: prompts whose leaves hold a success and a failure / prompts with ≥ 1 leaf;
* mixed_anchors: anchors y (root or non-leaf node) with n_y ≥ 2 leaves below, both outcomes among them;
  mixed_per_1k_tokens: the same per 1,000 generated tokens;
* realised_contrast: Σ over anchors with n_y ≥ 2 of the leaves' outcome variance p̂_y(1 − p̂_y),
  p̂_y = k_y / n_y their success rate (0 unless mixed; 0.25 for an even split);
* expected_contrast: the same sum in expectation over the leaves' final coin flips, R_ℓ ~ Bernoulli(V_ℓ)
  independent given the leaves' true values V_ℓ (never the predictor's): with S1 = Σ V_ℓ and
  S2 = Σ V_ℓ², E[k(n − k)] = (n − 1)·S1 + S2 − S1², so E[p̂(1 − p̂)] = that / n². Where a tree's shape
  does not depend on its own outcomes it has the mean of realised_contrast without the last draw's
  noise; TRACE's Stage 2 picks anchors from the chains' outcomes, so its realised contrast runs higher;
* leaves (trained on; DAPO: kept groups only), leaves_generated, prompts (with ≥ 1 leaf), tokens
  (generated token units, discarded work included), overshoot = max(0, tokens − budget).
Reported values are means over batches, then over seeds (with the standard deviation over seeds).
"""

from __future__ import annotations

import random
import statistics
import zlib

from tracerl.sim.allocators import ORDER, SIM_ALLOCATORS
from tracerl.sim.world import PromptStream, SimConfig, SimTree, TokenBudget, World

METRICS = ("effective_ratio", "mixed_anchors", "mixed_per_1k_tokens", "expected_contrast", "realised_contrast",
           "leaves", "leaves_generated", "prompts", "tokens", "overshoot")


def tree_contrast(tree: SimTree) -> tuple[bool, int, float, float]:
    """(prompt mixed, mixed anchors, realised contrast, expected contrast) of one prompt's tree."""
    size = len(tree)
    n, k, s1, s2 = [0] * size, [0] * size, [0.0] * size, [0.0] * size
    for i in range(size - 1, -1, -1):  # children have larger ids: every subtree is summed before its parent
        if tree.done[i]:  # a leaf has no children
            n[i], k[i], s1[i], s2[i] = 1, tree.reward[i], tree.value[i], tree.value[i] ** 2
        p = tree.parent[i]
        if p >= 0:
            n[p], k[p], s1[p], s2[p] = n[p] + n[i], k[p] + k[i], s1[p] + s1[i], s2[p] + s2[i]
    mixed = realised = expected = 0.0
    for i in range(size):
        if not tree.done[i] and n[i] >= 2:
            mixed += 0 < k[i] < n[i]
            realised += k[i] * (n[i] - k[i]) / n[i] ** 2
            expected += ((n[i] - 1) * s1[i] + s2[i] - s1[i] ** 2) / n[i] ** 2
    return 0 < k[0] < n[0], int(mixed), realised, expected


def batch_metrics(trees: list[SimTree], budget: TokenBudget) -> dict[str, float]:
    rows = [tree_contrast(t) for t in trees]
    n_prompts = sum(1 for t in trees if t.leaves())
    mixed_anchors = sum(r[1] for r in rows)
    return {
        "effective_ratio": sum(r[0] for r in rows) / max(n_prompts, 1),
        "mixed_anchors": mixed_anchors,
        "mixed_per_1k_tokens": 1000 * mixed_anchors / max(budget.spent, 1),
        "expected_contrast": sum(r[3] for r in rows),
        "realised_contrast": sum(r[2] for r in rows),
        "leaves": sum(len(t.leaves()) for t in trees if t.kept),
        "leaves_generated": sum(len(t.leaves()) for t in trees),
        "prompts": n_prompts,
        "tokens": budget.spent,
        "overshoot": max(0, budget.spent - budget.limit),
    }


def run_batch(cfg: SimConfig, name: str, seed: int, batch: int) -> tuple[list[SimTree], TokenBudget]:
    """One batch of one allocator. Prompts depend on (seed, batch) only, so every allocator sees the
    same prompt stream; rollouts use a stream of their own, (seed, batch, allocator)."""
    allocate = SIM_ALLOCATORS.get(name)
    world = World(cfg, random.Random(f"rollouts/{seed}/{batch}/{zlib.crc32(name.encode())}"))
    budget = TokenBudget(cfg.token_budget(), world)
    trees = allocate(world, PromptStream(cfg, seed, batch), budget, cfg)
    return trees, budget


def simulate(cfg: SimConfig, names: list[str] | str = "all", seed: int = 0, seeds: int = 1,
             batches: int = 10) -> dict:
    """Means (and standard deviations over seeds) of METRICS for each allocator at cfg's token budget."""
    if names == "all":
        names = list(ORDER)
    elif isinstance(names, str):
        names = [names]
    for name in names:
        SIM_ALLOCATORS.get(name)  # fail early, listing the valid names
    if seeds < 1 or batches < 1:
        raise ValueError(f"need seeds ≥ 1 and batches ≥ 1, got seeds={seeds}, batches={batches}")
    means, stds = {}, {}
    for name in names:
        per_seed = []
        for s in range(seed, seed + seeds):
            rows = [batch_metrics(*run_batch(cfg, name, s, b)) for b in range(batches)]
            per_seed.append({m: statistics.fmean(r[m] for r in rows) for m in METRICS})
        means[name] = {m: statistics.fmean(r[m] for r in per_seed) for m in METRICS}
        stds[name] = {m: statistics.stdev(r[m] for r in per_seed) if seeds > 1 else 0.0 for m in METRICS}
    return {"config": cfg.as_dict(), "budget": cfg.token_budget(), "seed": seed, "seeds": seeds,
            "batches": batches, "allocators": means, "std_over_seeds": stds}


def summary_table(result: dict):
    """A rich Table of the main metrics (± standard deviation over seeds when there are several)."""
    from rich.table import Table

    cfg = result["config"]
    title = (f"simulated batch: {result['budget']} tokens, B={cfg['prompts']}, T={cfg['turns']}, "
             f"difficulty {cfg['difficulty']}, s={cfg['turn_strength']}, "
             f"predictor {'oracle' if cfg['oracle'] else 'σ=' + str(cfg['predictor_noise'])}; "
             f"{result['seeds']} seed(s) × {result['batches']} batches")
    table = Table(title=title)
    cols = [("allocator", None, ""), ("eff. ratio", "effective_ratio", ".3f"),
            ("mixed anchors", "mixed_anchors", ".1f"),
            ("mixed/1k tok", "mixed_per_1k_tokens", ".2f"), ("exp. contrast", "expected_contrast", ".2f"),
            ("real. contrast", "realised_contrast", ".2f"), ("leaves", "leaves", ".0f"), ("prompts", "prompts", ".1f"),
            ("tokens", "tokens", ".0f")]
    for head, _, _ in cols:
        table.add_column(head, justify="left" if head == "allocator" else "right", no_wrap=True)
    for name, row in result["allocators"].items():
        std = result["std_over_seeds"][name]
        cells = [name]
        for _, key, fmt in cols[1:]:
            cell = format(row[key], fmt)
            if result["seeds"] > 1 and key in ("effective_ratio", "mixed_anchors", "realised_contrast"):
                cell += f" ± {format(std[key], fmt)}"
            cells.append(cell)
        table.add_row(*cells)
    return table
