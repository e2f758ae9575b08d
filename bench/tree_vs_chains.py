"""Benchmark: Tree-GRPO rollout trees vs GRPO chains at equal generated-token cost (no training).

The policy is the quickstart's SFT warm-started tiny model (default config, taken from the SFT
cache) and stays fixed. Every method samples the same steps' prompts (`Trainer.sample_tasks(step)`)
with the same per-step sampling seed, through `Trainer.rollout`, i.e. the trainer's own allocator
and rollout engine. Methods:

* chains:       `uniform`, G = 8 chains per prompt (the quickstart);
* tree:         `tree_grpo` with the shape `match_tree_shape(G, f)`, where f, the generated tokens of a
                continuation over those of a chain, is *measured* first by a short calibration
                (tree_grpo with M, N, L = 2, 2, 1 on other steps' prompts);
* chains+budget / tree+budget (unless --no-budget): both again with `rollout.token_budget` set to
  the same per-prompt value (default: the chains' measured mean generated tokens per prompt), so
  each prompt keeps receiving chains / expansion rounds until it has spent it; trees keep all leaves.

Per method: generated tokens, leaves, effective ratio (share of prompts whose leaves hold both a
success and a failure), mixed anchors (root or inner nodes with >= 2 leaves and both outcomes
below) per prompt and per 1k generated tokens, prefill tokens computed / saved by KV-prefix reuse,
and wall seconds per step. The metrics come from one pass over the steps; the seconds from a separate
timing pass that re-runs the first --time-steps steps of every method, interleaved, --repeats times
(identical work each time: same seeds), and reports the median and min.

    .venv/bin/python bench/tree_vs_chains.py                    # 10 steps x 8 prompts
    .venv/bin/python bench/tree_vs_chains.py --steps 3 --json   # quicker; extra args are config overrides
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tracerl.algos.metrics import effective_ratio
from tracerl.allocate.basic import match_tree_shape
from tracerl.config import RolloutConfig, load_config
from tracerl.rollout import RolloutCost
from tracerl.train import Trainer
from tracerl.tree import mixed_anchors, tree_leaves


from _results import save_result  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]


def set_rollout(trainer: Trainer, **update) -> None:
    """Swap the trainer's rollout section for a validated copy with `update` applied."""
    trainer.cfg.rollout = RolloutConfig.model_validate({**trainer.cfg.rollout.model_dump(), **update})


def run_method(trainer: Trainer, steps: list[int], log) -> dict:
    rows, total = [], RolloutCost()
    for step in steps:
        t0 = time.perf_counter()
        trees, cost = trainer.rollout(step)
        wall = time.perf_counter() - t0
        total.add(cost)
        leaves = tree_leaves(trees)
        rewards = torch.tensor([lf.reward for lf in leaves], dtype=torch.float32)
        groups = torch.tensor([lf.tree.group for lf in leaves], dtype=torch.long)
        prompts = len({t.group for t in trees})
        outcomes: dict[int, set[bool]] = {}
        for lf in leaves:
            outcomes.setdefault(lf.tree.group, set()).add(lf.reward > 0)
        rows.append({"step": step, "prompts": prompts, "wall_s": wall, "gen_tokens": cost.gen_tokens,
                     "prefill_tokens": cost.prefill_tokens, "prefill_saved": cost.prefill_saved,
                     "trajectories": cost.trajectories, "continuations": cost.continuations,
                     "continuation_gen_tokens": cost.continuation_gen_tokens, "tool_calls": cost.tool_calls,
                     "leaves": len(leaves), "mixed_anchors": mixed_anchors(trees),
                     "effective_ratio": effective_ratio(rewards, groups),
                     "reward_mean": float(rewards.mean()) if len(leaves) else 0.0,
                     "mixed_prompts": sorted(g for g, o in outcomes.items() if len(o) == 2)})
        log(f"  step {step}: {wall:.1f} s, {cost.gen_tokens} gen tokens, {len(leaves)} leaves, "
            f"eff {rows[-1]['effective_ratio']:.2f}, mixed anchors {rows[-1]['mixed_anchors']}")
    n_prompts = sum(r["prompts"] for r in rows)
    gen = sum(r["gen_tokens"] for r in rows)
    mixed = sum(r["mixed_anchors"] for r in rows)
    walls = [r["wall_s"] for r in rows]
    return {
        "rollout": trainer.cfg.rollout.model_dump(mode="json"),
        "prompts": n_prompts,
        "gen_tokens_per_prompt": gen / n_prompts,
        "trajectories_per_prompt": sum(r["trajectories"] for r in rows) / n_prompts,
        "leaves_per_prompt": sum(r["leaves"] for r in rows) / n_prompts,
        "effective_ratio": sum(r["effective_ratio"] * r["prompts"] for r in rows) / n_prompts,
        "reward_mean": statistics.mean(r["reward_mean"] for r in rows),
        "mixed_anchors_per_prompt": mixed / n_prompts,
        "mixed_anchors_per_1k_gen_tokens": 1000 * mixed / max(gen, 1),
        "prefill_tokens_per_prompt": sum(r["prefill_tokens"] for r in rows) / n_prompts,
        "prefill_saved_per_prompt": sum(r["prefill_saved"] for r in rows) / n_prompts,
        "tool_calls_per_prompt": sum(r["tool_calls"] for r in rows) / n_prompts,
        "continuation_fraction": total.continuation_fraction,
        "wall_s_per_step_median": statistics.median(walls),
        "wall_s_per_step_min": min(walls),
        "wall_s_per_step_mean": statistics.mean(walls),
        "steps": rows,
    }


def paired(method: dict, ref: dict) -> dict:
    """Prompt by prompt (the same prompts in both): how many have mixed outcomes in one method only."""
    mine = {(r["step"], g) for r in method["steps"] for g in r["mixed_prompts"]}
    theirs = {(r["step"], g) for r in ref["steps"] for g in r["mixed_prompts"]}
    return {"mixed_in_both": len(mine & theirs), "mixed_only_here": len(mine - theirs),
            "mixed_only_in_chains": len(theirs - mine)}


def table(methods: dict[str, dict]) -> str:
    head = ("| method | rollout shape | gen tokens / prompt | leaves / prompt | effective ratio | "
            "mixed anchors / prompt | mixed anchors / 1k gen tokens | prefill computed / prompt | "
            "prefill saved / prompt | wall s / step (median, min of repeats) |")
    lines = [head, "|" + "---|" * 10]
    for name, m in methods.items():
        r = m["rollout"]
        if r["allocator"] == "uniform":
            shape = f"G={r['group_size']}"
        else:
            k = r["leaves_per_tree"] if r["leaves_per_tree"] is not None else "all"
            shape = f"M={r['trees_per_prompt']} N={r['expansions']} L={r['rounds']} K={k}"
        if r["token_budget"]:
            shape += f", budget {r['token_budget']}"
        lines.append(f"| {name} | {shape} | {m['gen_tokens_per_prompt']:.0f} | {m['leaves_per_prompt']:.2f} | "
                     f"{m['effective_ratio']:.3f} | {m['mixed_anchors_per_prompt']:.2f} | "
                     f"{m['mixed_anchors_per_1k_gen_tokens']:.3f} | {m['prefill_tokens_per_prompt']:.0f} | "
                     f"{m['prefill_saved_per_prompt']:.0f} | {m['timing']['median_s_per_step']:.2f}, "
                     f"{m['timing']['min_s_per_step']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="evaluated steps (prompt sets), steps 0 .. steps-1")
    ap.add_argument("--group-size", type=int, default=8, help="G: chains per prompt, and the tree's cost target")
    ap.add_argument("--calib-steps", type=int, default=3, help="tree_grpo (2, 2, 1) steps that measure f")
    ap.add_argument("--calib-start", type=int, default=1000, help="first calibration step (other prompts than the evaluated ones)")
    ap.add_argument("--budget", type=int, default=None, help="per-prompt token budget of the equal-budget runs "
                    "(default: the chains' measured generated tokens per prompt)")
    ap.add_argument("--no-budget", action="store_true", help="skip the equal-budget runs")
    ap.add_argument("--repeats", type=int, default=5, help="timing pass: interleaved repeats per method")
    ap.add_argument("--time-steps", type=int, default=2, help="timing pass: the first this many steps, re-run each repeat")
    ap.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "tree_vs_chains.json"))
    ap.add_argument("overrides", nargs="*", help="config overrides (section.key=value), applied to the default config")
    args = ap.parse_args()
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))

    t_start = time.time()
    run_dir = tempfile.mkdtemp(prefix="tracerl-bench-tree-")
    cfg = load_config(None, [f"run.dir={run_dir}", "trainer.tensorboard=false", "trainer.progress=false",
                             f"rollout.group_size={args.group_size}", *args.overrides])
    trainer = Trainer(cfg, overwrite=True, log=log)
    trainer.setup()  # SFT model from the cache (waits on its lock if that SFT is still running)
    log(f"policy: {trainer.model_path} ({sum(p.numel() for p in trainer.model.parameters()):,} parameters), "
        f"{torch.get_num_threads()} threads")
    steps = list(range(args.steps))
    methods: dict[str, dict] = {}
    updates: dict[str, dict] = {}  # each method's rollout settings, replayed by the timing pass
    try:
        log(f"calibration: tree_grpo M=2 N=2 L=1 on steps {args.calib_start}..{args.calib_start + args.calib_steps - 1}")
        set_rollout(trainer, allocator="tree_grpo", trees_per_prompt=2, expansions=2, rounds=1, leaves_per_tree=None,
                    token_budget=None)
        calib = run_method(trainer, list(range(args.calib_start, args.calib_start + args.calib_steps)), log)
        f = calib["continuation_fraction"]
        shape = match_tree_shape(args.group_size, f)
        log(f"measured f = {f:.3f} -> tree shape {shape}")

        tree_shape = {k: shape[k] for k in ("trees_per_prompt", "expansions", "rounds", "leaves_per_tree")}
        updates["chains"] = {"allocator": "uniform", "token_budget": None}
        updates["tree"] = {"allocator": "tree_grpo", **tree_shape, "token_budget": None}
        budget = None
        for name, update in list(updates.items()) + [("chains+budget", None), ("tree+budget", None)]:
            if update is None:  # the equal-budget runs: their budget is the chains' measured cost
                if args.no_budget:
                    continue
                budget = args.budget or round(methods["chains"]["gen_tokens_per_prompt"])
                base = updates[name.removesuffix("+budget")]
                update = updates[name] = {**base, "token_budget": budget,
                                          **({"leaves_per_tree": None} if base["allocator"] == "tree_grpo" else {})}
            log(f"{name}: {update}")
            set_rollout(trainer, **update)
            methods[name] = run_method(trainer, steps, log)
        for name in methods:
            if name != "chains":
                methods[name]["paired_vs_chains"] = paired(methods[name], methods["chains"])

        time_steps = steps[: args.time_steps]
        log(f"timing: {args.repeats} interleaved repeats of steps {time_steps} per method")
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name in methods:
                set_rollout(trainer, **updates[name])
                t0 = time.perf_counter()
                for step in time_steps:
                    trainer.rollout(step)
                times[name].append((time.perf_counter() - t0) / len(time_steps))
        for name, ts in times.items():
            methods[name]["timing"] = {"steps": time_steps, "repeats_s_per_step": ts,
                                       "median_s_per_step": statistics.median(ts), "min_s_per_step": min(ts)}
            log(f"  {name}: median {statistics.median(ts):.2f} s/step, min {min(ts):.2f}")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    result = {
        "model_path": str(trainer.model_path), "steps": steps, "prompts_per_step": cfg.rollout.prompts_per_step,
        "group_size": args.group_size, "overrides": args.overrides, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "torch": torch.__version__,
        "calibration": {"steps": calib["steps"], "shape": {"trees_per_prompt": 2, "expansions": 2, "rounds": 1},
                        "continuation_fraction": f, "gen_tokens_per_prompt": calib["gen_tokens_per_prompt"]},
        "matched_shape": shape, "token_budget": budget, "methods": methods,
        "wall_s": round(time.time() - t_start, 1),
    }
    save_result(result, args.out, args.json)
    if args.json:
        return
    print(f"\nmeasured f = {f:.3f} (calibration, {args.calib_steps} steps); matched shape: M={shape['trees_per_prompt']} "
          f"N={shape['expansions']} L={shape['rounds']} K={shape['leaves_per_tree']}, expected cost "
          f"{shape['expected_cost_chains']:.2f} chains for {shape['leaves']} leaves")
    print(table(methods))
    for name, m in methods.items():
        if "paired_vs_chains" in m:
            p = m["paired_vs_chains"]
            print(f"{name} vs chains, prompt by prompt: mixed in both {p['mixed_in_both']}, only {name} "
                  f"{p['mixed_only_here']}, only chains {p['mixed_only_in_chains']} (of {m['prompts']})")
    print(f"results: {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
