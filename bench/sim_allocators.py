"""Benchmark: the shipped allocators at equal token budget on the rollout-free simulator (`tracerl sim`).

Runs the scenarios of bench/results/sim_allocators.md (difficulty distributions × predictor noise, 5
seeds × 10 batches each), the TRACE ablation on Beta(0.5, 0.5) (pool, Stage 2 rounds, root restarts,
exploration share) and the issue's criterion: TRACE's effective ratio against uniform's and against
its own oracle's at the same settings. Allocation options are the training config's (rollout.* /
alloc.* overrides on top of tracerl.sim.SIM_DEFAULTS), world options the simulator's (SimConfig).

    python bench/sim_allocators.py                      # ≈ 1 min on one core
    python bench/sim_allocators.py --seeds 2 --batches 3   # a quick look

Writes bench/results/sim_allocators.json and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tracerl.sim import SimConfig, allocator_names, simulate

REPO = Path(__file__).resolve().parents[1]
NOISES = ("oracle", 0.5, 1.0, 2.0)
SCENARIOS = {  # name: (SimConfig options, rollout / alloc overrides, predictor settings)
    "beta:0.5,0.5": (dict(difficulty="beta:0.5,0.5"), [], NOISES),
    "beta:2,5": (dict(difficulty="beta:2,5"), [], NOISES),
    "uniform, T = 5, early stop 0.2, s = 0.5": (dict(difficulty="uniform", turns=5, early_stop=0.2, turn_strength=0.5),
                                                [], ("oracle", 1.0)),
    "beta:0.5,0.5, twice the budget": (dict(difficulty="beta:0.5,0.5"), ["rollout.token_budget=1920"], (1.0,)),
}
ABLATION = {  # TRACE variants on beta:0.5,0.5 (alloc.* overrides)
    "pool 2B (training default), 1 round, no root": ["alloc.pool_factor=2", "alloc.rounds=1", "alloc.stage2_root=false"],
    "pool 4B, 1 round, no root": ["alloc.rounds=1", "alloc.stage2_root=false"],
    "pool 4B, 2 rounds, no root": ["alloc.rounds=2", "alloc.stage2_root=false"],
    "default: pool 4B, 2 rounds, root": [],
    "pool 4B, 3 rounds, root": ["alloc.rounds=3"],
    "default, ε = 0.05": ["alloc.epsilon=0.05"],
    "default, ε = 0": ["alloc.epsilon=0"],
}
COLUMNS = ("effective_ratio", "mixed_anchors", "mixed_per_1k_tokens", "expected_contrast", "realised_contrast",
           "leaves", "prompts", "tokens")


def predictor(noise) -> dict:
    return dict(oracle=True) if noise == "oracle" else dict(predictor_noise=float(noise))


def label(noise) -> str:
    return "oracle" if noise == "oracle" else f"σ = {noise}"


def row(name: str, pred: str, mean: dict, std: dict) -> str:
    m, s = mean, std
    return (f"| {name} | {pred} | {m['effective_ratio']:.3f} ± {s['effective_ratio']:.3f} | "
            f"{m['mixed_anchors']:.1f} ± {s['mixed_anchors']:.1f} | {m['mixed_per_1k_tokens']:.2f} | "
            f"{m['expected_contrast']:.2f} | {m['realised_contrast']:.2f} ± {s['realised_contrast']:.2f} | "
            f"{m['leaves']:.0f} | {m['prompts']:.1f} | {m['tokens']:.0f} |")


HEADER = ("| allocator | predictor | effective ratio | mixed anchors | mixed / 1k tok | expected contrast | "
          "realised contrast | leaves | prompts | tokens |\n|---|---|---|---|---|---|---|---|---|---|")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "sim_allocators.json"))
    args = ap.parse_args()
    t0 = time.time()
    out: dict = {"seeds": args.seeds, "batches": args.batches, "scenarios": {}, "ablation": {}}
    order = allocator_names()
    for name, (opts, overrides, noises) in SCENARIOS.items():
        print(f"\n### {name}\n\n{HEADER}")
        runs = {}
        for noise in noises:
            # the allocators that ignore the predictor give the same rows at every noise: run them once
            names = order if noise == noises[0] else ["pcl", "trace"]
            res = simulate(SimConfig(**opts, **predictor(noise)), overrides, names, seeds=args.seeds,
                           batches=args.batches)
            runs[label(noise)] = res
        for alloc in order:
            for noise in noises:
                res = runs[label(noise)]
                if alloc in res["allocators"] and (alloc in ("pcl", "trace") or noise == noises[0]):
                    pred = label(noise) if alloc in ("pcl", "trace") else "—"
                    print(row(alloc, pred, res["allocators"][alloc], res["std_over_seeds"][alloc]))
        out["scenarios"][name] = runs
    print(f"\n### TRACE ablation, beta:0.5,0.5\n\n{HEADER.replace('allocator', 'TRACE variant')}")
    for name, overrides in ABLATION.items():
        for noise in ("oracle", 0.5, 1.0):
            res = simulate(SimConfig(difficulty="beta:0.5,0.5", **predictor(noise)), overrides, ["trace"],
                           seeds=args.seeds, batches=args.batches)
            out["ablation"][f"{name} / {label(noise)}"] = res
            print(row(name, label(noise), res["allocators"]["trace"], res["std_over_seeds"]["trace"]))
    base = out["scenarios"]["beta:0.5,0.5"]
    uni = base[label(NOISES[0])]["allocators"]["uniform"]["effective_ratio"]
    oracle = base["oracle"]["allocators"]["trace"]["effective_ratio"]
    print("\n### Criterion (beta:0.5,0.5, default TRACE): effective ratio vs uniform and vs its own oracle\n")
    print("| predictor | TRACE | ÷ uniform | ÷ TRACE oracle |\n|---|---|---|---|")
    out["criterion"] = {}
    for noise in NOISES:
        e = base[label(noise)]["allocators"]["trace"]["effective_ratio"]
        out["criterion"][label(noise)] = {"trace": e, "vs_uniform": e / uni, "vs_oracle": e / oracle}
        print(f"| {label(noise)} | {e:.3f} | {e / uni:.2f}× | {e / oracle:.1%} |")
    out["wall_s"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\n(wall {out['wall_s']} s; raw: {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
