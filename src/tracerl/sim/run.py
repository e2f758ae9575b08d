"""Run the shipped allocators on the simulated world and measure the contrast they buy.

Each allocator of `tracerl.allocate.ALLOCATORS` runs as in training (`tracerl train
rollout.allocator=NAME`): it gets an `AllocationContext` with the training config's rollout and alloc
sections, a `SimEngine` (engine.py) in place of the rollout engine, a `SimPredictor` in place of the
success predictor, the prompts' earlier success rates (`prompt_stats`) and a prompt source for pools
and refills. Options are the training config's, as dotted overrides (`rollout.group_size=8`,
`alloc.epsilon=0.1`, ...), on top of the simulator's defaults (`SIM_DEFAULTS`; the token budget
defaults to G chains per prompt in expectation, `default_token_budget`).

Per batch (docs/cost.md §8, §10), over every tree the engine planted (DAPO's dropped groups too); a prompt's
root is one anchor pooling the leaves of all its trees (Tree-GRPO's M trees, TRACE's one tree per bare
rollout), every non-leaf turn node one more:
* effective_ratio: prompts whose leaves hold a success and a failure / prompts with ≥ 1 leaf;
* mixed_anchors: anchors with n_y ≥ 2 leaves below, both outcomes among them;
  mixed_per_1k_tokens: the same per 1,000 generated tokens;
* realised_contrast: Σ over anchors with n_y ≥ 2 of the leaves' outcome variance p̂_y(1 − p̂_y),
  p̂_y = k_y / n_y their success rate (0 unless mixed; 0.25 for an even split);
* expected_contrast: the same sum in expectation over the leaves' final coin flips, R_ℓ ~ Bernoulli(V_ℓ)
  independent given the leaves' true values V_ℓ (never the predictor's): with S1 = Σ V_ℓ and
  S2 = Σ V_ℓ², E[k(n − k)] = (n − 1)·S1 + S2 − S1², so E[p̂(1 − p̂)] = that / n². Where a tree's shape
  does not depend on its own outcomes it has the mean of realised_contrast without the last draw's
  noise; TRACE's Stage 2 picks anchors from the chains' outcomes, so its realised contrast runs higher;
* leaves: leaves of the trees the allocator returns (trained on; DAPO: the kept groups);
  leaves_generated: trajectories generated; prompts: prompts with ≥ 1 leaf; tokens: the engine's
  generated tokens (discarded work included); overshoot = max(0, tokens − step budget).
Reported values are means over batches, then over seeds (with the standard deviation over seeds);
`alloc_metrics` holds the means of the allocators' own metrics (ctx.metrics).
"""

from __future__ import annotations

import random
import statistics
import zlib
from dataclasses import dataclass

from tracerl.allocate import ALLOCATORS, AllocationContext
from tracerl.allocate.budget import CostModel
from tracerl.config import Config, ConfigError, load_config, parse_overrides
from tracerl.errors import OptionError
from tracerl.sim.engine import SimEngine, SimPredictor
from tracerl.sim.world import PromptStream, SimConfig, World
from tracerl.tree import RolloutTree

METRICS = ("effective_ratio", "mixed_anchors", "mixed_per_1k_tokens", "expected_contrast", "realised_contrast",
           "leaves", "leaves_generated", "prompts", "tokens", "overshoot")
TABLE_ORDER = ("uniform", "tree_grpo", "dapo", "pcl", "knapsack", "trace")
# where the simulator's defaults differ from training's: a batch of 64 prompts, PCL and TRACE score 4B
SIM_DEFAULTS = ("rollout.prompts_per_step=64", "alloc.pool_factor=4")


def allocator_names() -> list[str]:
    """Every shipped allocator, in table order (any not in TABLE_ORDER last, by name)."""
    names = ALLOCATORS.names()
    return [n for n in TABLE_ORDER if n in names] + sorted(set(names) - set(TABLE_ORDER))


def default_token_budget(sim: SimConfig, group_size: int) -> int:
    """Generated tokens per prompt: G chains in expectation."""
    return round(group_size * sim.expected_chain_tokens())


def build_config(sim: SimConfig, overrides: list[str] | tuple[str, ...] = (), allocator: str = "uniform") -> Config:
    """The training config `tracerl train rollout.allocator=ALLOCATOR` would build from SIM_DEFAULTS and
    the overrides (rollout.* and alloc.* only), validated the same way; rollout.token_budget defaults to
    `default_token_budget` (`rollout.token_budget=null`: no budget, the allocators' own counts)."""
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    bad = [k for k in keys if not k.startswith(("rollout.", "alloc.")) or k == "rollout.allocator"]
    if bad:
        raise OptionError(f"tracerl sim takes rollout.* and alloc.* overrides only (the allocator: --allocator), "
                          f"not {', '.join(bad)}")
    ALLOCATORS.get(allocator)  # the unknown-name error, listing the valid names
    cfg = load_config(None, [*SIM_DEFAULTS, *overrides, f"rollout.allocator={allocator}"])
    # the allocator's own check, as tracerl.methods.check_methods runs it for training (that module would
    # also load the estimators, and torch with them, for checks that do not concern the simulator)
    check = ALLOCATORS.trait(allocator, "check")
    problem = check(cfg.rollout, cfg.alloc) if check is not None else None
    if problem:
        raise ConfigError(problem)
    if "token_budget" not in parse_overrides(list(overrides)).get("rollout", {}):
        cfg.rollout.token_budget = default_token_budget(sim, cfg.rollout.group_size)
    return cfg


def step_budget(cfg: Config) -> int | None:
    """Generated tokens the step may spend (AllocationContext.step_budget of the batch), None without a budget."""
    r = cfg.rollout
    return r.token_budget * r.prompts_per_step if r.token_budget else None


@dataclass
class SimBatch:
    engine: SimEngine  # engine.trees: every tree planted; engine.cost: what it generated
    trees: list[RolloutTree]  # what the allocator returned (trained on)
    metrics: dict[str, float]  # the allocator's own (ctx.metrics, pool_size)
    budget: int | None


def run_batch(sim: SimConfig, cfg: Config, seed: int, batch: int, costs: CostModel | None = None) -> SimBatch:
    """One batch of `cfg.rollout.allocator`. Prompts depend on (seed, batch) only, so every allocator sees
    the same prompt stream; rollouts and the allocator's own draws use streams of their own,
    (seed, batch, allocator). `costs`: the running cost estimates carried from earlier batches, as
    training carries them from step to step (updated in place); None: fresh (the priors)."""
    name = cfg.rollout.allocator
    tag = f"{seed}/{batch}/{zlib.crc32(name.encode())}"
    prompts = PromptStream(sim, cfg.rollout.group_size, seed, batch)
    tasks = prompts.batch(cfg.rollout.prompts_per_step)
    engine = SimEngine(World(sim, random.Random(f"rollouts/{tag}")))
    ctx = AllocationContext(engine, cfg.rollout, random.Random(f"alloc/{tag}"), cfg.alloc,
                            SimPredictor(sim.predictor_noise, sim.oracle),
                            {t.id: t.meta["last_rate"] for t in tasks}, prompts.draw, costs=costs)
    trees = ALLOCATORS.get(name)(ctx, tasks)
    return SimBatch(engine, trees, {"pool_size": float(len(tasks) + ctx.drawn), **ctx.metrics}, step_budget(cfg))


def _node_sums(tree: RolloutTree) -> dict[int, tuple[int, int, float, float]]:
    """Per node: (leaves below n, successes k, S1 = Σ V of those leaves, S2 = Σ V²)."""
    sums: dict[int, tuple[int, int, float, float]] = {}
    for i in sorted(tree.nodes, reverse=True):  # children have larger ids than their parent
        node = tree.nodes[i]
        if node.done:
            v = node.state["v"]
            sums[i] = (1, int((node.reward or 0.0) > 0), v, v * v)
        else:
            kids = [sums[c] for c in node.children]
            sums[i] = (sum(c[0] for c in kids), sum(c[1] for c in kids), sum(c[2] for c in kids),
                       sum(c[3] for c in kids))
    return sums


def prompt_contrast(trees: list[RolloutTree]) -> tuple[bool, int, float, float]:
    """(prompt mixed, mixed anchors, realised contrast, expected contrast) of one prompt's trees."""
    per_tree = [_node_sums(t) for t in trees]
    root = tuple(sum(s[0][j] for s in per_tree) for j in range(4))
    anchors = [root] + [s[i] for t, s in zip(trees, per_tree) for i, node in t.nodes.items() if i and not node.done]
    mixed = realised = expected = 0.0
    for n, k, s1, s2 in anchors:
        if n >= 2:
            mixed += 0 < k < n
            realised += k * (n - k) / n ** 2
            expected += ((n - 1) * s1 + s2 - s1 ** 2) / n ** 2
    return 0 < root[1] < root[0], int(mixed), realised, expected


def batch_metrics(b: SimBatch) -> dict[str, float]:
    by_prompt: dict[str, list[RolloutTree]] = {}
    for t in b.engine.trees:
        by_prompt.setdefault(t.task.id, []).append(t)
    rows = [prompt_contrast(ts) for ts in by_prompt.values() if any(len(t.nodes) > 1 for t in ts)]
    spent = b.engine.cost.gen_tokens
    return {
        "effective_ratio": sum(r[0] for r in rows) / max(len(rows), 1),
        "mixed_anchors": sum(r[1] for r in rows),
        "mixed_per_1k_tokens": 1000 * sum(r[1] for r in rows) / max(spent, 1),
        "expected_contrast": sum(r[3] for r in rows),
        "realised_contrast": sum(r[2] for r in rows),
        "leaves": sum(len(t.leaf_ids()) for t in b.trees),
        "leaves_generated": b.engine.cost.trajectories,
        "prompts": len(rows),
        "tokens": spent,
        "overshoot": max(0, spent - b.budget) if b.budget else 0,
    }


def _resolve(names: list[str] | str) -> list[str]:
    if names == "all":
        return allocator_names()
    return [names] if isinstance(names, str) else list(names)


def simulate(sim: SimConfig, overrides: list[str] | tuple[str, ...] = (), names: list[str] | str = "all",
             seed: int = 0, seeds: int = 1, batches: int = 10) -> dict:
    """Means (and standard deviations over seeds) of METRICS for each allocator under one config."""
    names = _resolve(names)
    configs = {name: build_config(sim, overrides, name) for name in names}  # fail early on a bad name or key
    if seeds < 1 or batches < 1:
        raise ValueError(f"need seeds ≥ 1 and batches ≥ 1, got seeds={seeds}, batches={batches}")
    means, stds, extras = {}, {}, {}
    for name in names:
        per_seed, alloc_rows = [], []
        for s in range(seed, seed + seeds):
            costs = CostModel()  # carried from batch to batch, as from step to step in training
            runs = [run_batch(sim, configs[name], s, b, costs) for b in range(batches)]
            rows = [batch_metrics(r) for r in runs]
            per_seed.append({m: statistics.fmean(r[m] for r in rows) for m in METRICS})
            alloc_rows += [r.metrics for r in runs]
        means[name] = {m: statistics.fmean(r[m] for r in per_seed) for m in METRICS}
        stds[name] = {m: statistics.stdev(r[m] for r in per_seed) if seeds > 1 else 0.0 for m in METRICS}
        extras[name] = {k: statistics.fmean(r.get(k, 0.0) for r in alloc_rows) for k in alloc_rows[0]}
    cfg = configs[names[0]]
    return {"sim": sim.as_dict(), "rollout": cfg.rollout.model_dump(exclude={"allocator"}),
            "alloc": cfg.alloc.model_dump(), "overrides": list(overrides), "budget": step_budget(cfg),
            "seed": seed, "seeds": seeds, "batches": batches, "allocators": means, "std_over_seeds": stds,
            "alloc_metrics": extras}


def summary_table(result: dict):
    """A rich Table of the main metrics (± standard deviation over seeds when there are several)."""
    from rich.table import Table

    sim, r = result["sim"], result["rollout"]
    budget = f"{result['budget']} tokens" if result["budget"] else "no token budget"
    title = (f"simulated batch: {budget}, B={r['prompts_per_step']}, G={r['group_size']}, T={sim['turns']}, "
             f"difficulty {sim['difficulty']}, s={sim['turn_strength']}, "
             f"predictor {'oracle' if sim['oracle'] else 'σ=' + str(sim['predictor_noise'])}; "
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
