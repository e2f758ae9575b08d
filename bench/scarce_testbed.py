"""Benchmark: how scarce contrast is on the scarce-contrast testbed (`configs/scarce.yaml`, issue 18).

Per seed, runs uniform GRPO (the preset as is: 8 prompts x 8 samples per step) for 20 steps with every
step's rollouts logged (trainer.tree_log_every=1), then reports
- the effective ratio (share of groups with both outcomes, `tracerl.algos.metrics.effective_ratio`),
  mean over steps 1-20, from metrics.jsonl;
- the share of the sampled prompts per outcome class (all-solved / all-failed / mixed), overall and by
  hop count, from the logged rollouts;
- greedy validation EM by hop count of the warm start and of the policy after the 20 steps.
The SFT warm start is the preset's (sft.seed fixed, cached under $TRACERL_CACHE); seeds vary run.seed.

    .venv/bin/python bench/scarce_testbed.py --seeds 0 1 [--steps 20] [--out bench/results/scarce.json] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "scarce.yaml"


def outcome_classes(run_dir: Path) -> dict[str, dict[str, float]]:
    """{hops or "all": {all_solved, all_failed, mixed, n}} over the prompts of every logged step."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    hops: dict[tuple, int] = {}
    for f in sorted((run_dir / "trees").glob("step_*.jsonl")):
        for line in open(f):
            tree = json.loads(line)
            key = (tree["step"], tree["group"])
            hops[key] = tree["task"]["meta"]["hops"]
            groups[key] += [float(n["reward"] or 0.0) for n in tree["nodes"] if not n.get("children")]
    out: dict[str, dict[str, float]] = {}
    for label in ["all", *sorted({str(h) for h in hops.values()})]:
        keys = [k for k in groups if label == "all" or str(hops[k]) == label]
        cls = [("all_solved" if min(groups[k]) > 0 else "all_failed" if max(groups[k]) <= 0 else "mixed") for k in keys]
        out[label] = {c: round(cls.count(c) / len(cls), 3) for c in ("all_solved", "all_failed", "mixed")}
        out[label]["n"] = len(cls)
    return out


def em_by_hops(cfg_path: Path, overrides: list[str], model_dir: Path | None) -> dict[str, float]:
    """Greedy validation EM by hop count (model_dir None: the preset's warm start)."""
    from tracerl.backends.hf import HFPolicy
    from tracerl.config import load_config
    from tracerl.evaluate import evaluate
    from tracerl.models.io import load_policy
    from tracerl.setup import apply_threads, build_env, resolve_model_path

    cfg = load_config(str(cfg_path), overrides)
    apply_threads(cfg)
    env = build_env(cfg)
    model, tok = load_policy(model_dir or resolve_model_path(cfg))
    policy = HFPolicy(model, tok, cfg.run.device, cfg.model.max_context)
    tasks = env.tasks("validation")[: cfg.trainer.eval_size]
    _, trajs = evaluate(policy, env, tasks, cfg.rollout.max_turn_tokens, cfg.model.chat_template, cfg.rollout.batch_size)
    by: dict[str, list[float]] = defaultdict(list)
    for t in trajs:
        r = 1.0 if t.reward > 0 else 0.0
        by["all"].append(r)
        by[str(t.task.meta["hops"])].append(r)
    return {k: round(statistics.mean(v), 3) for k, v in sorted(by.items())}


def run_seed(seed: int, steps: int, overrides: list[str], runs_dir: Path) -> dict:
    run_dir = runs_dir / f"scarce-seed{seed}"
    extra = ["run.threads=1", f"run.seed={seed}", f"run.dir={run_dir}", f"trainer.steps={steps}",
             "trainer.tree_log_every=1", "trainer.eval_at_start=false", f"trainer.eval_every={steps}",
             f"trainer.checkpoint_every={steps}", "trainer.progress=false", "trainer.tensorboard=false", *overrides]
    cmd = [sys.executable, "-m", "tracerl.cli", "train", "--overwrite", "--config", str(CONFIG), *extra]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.time() - t0
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][:steps]
    from tracerl.checkpoint import latest_checkpoint

    final_model = latest_checkpoint(run_dir / "checkpoints") / "model"
    eval_overrides = ["run.threads=1", *overrides]
    return {"seed": seed, "steps": len(metrics), "train_wall_s": round(wall, 1),
            "rl_s": round(sum(m["rollout_s"] + m["update_s"] for m in metrics), 1),
            "effective_ratio": round(statistics.mean(m["effective_ratio"] for m in metrics), 3),
            "effective_ratio_per_step": [round(m["effective_ratio"], 3) for m in metrics],
            "reward_mean": round(statistics.mean(m["reward_mean"] for m in metrics), 3),
            "outcome_classes": outcome_classes(run_dir),
            "val_em_warm_start": em_by_hops(CONFIG, eval_overrides, None),
            "val_em_after": em_by_hops(CONFIG, eval_overrides, final_model)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scarce.json"))
    ap.add_argument("--runs-dir", default=str(REPO / "runs"))
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides of the preset")
    args = ap.parse_args()
    rows = []
    for s in args.seeds:
        rows.append(run_seed(s, args.steps, args.overrides, Path(args.runs_dir)))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))  # after each seed: partial results survive
    hop_keys = sorted({k for r in rows for k in r["outcome_classes"] if k != "all"})
    print(f"| seed | effective ratio (steps 1-{args.steps}) | train reward | prompts all-solved / all-failed / mixed | "
          + " | ".join(f"{h}-hop solved/failed/mixed" for h in hop_keys)
          + " | val EM warm start (all; by hops) | val EM after | RL s | train wall s |")
    print("|" + "---|" * (7 + len(hop_keys)))
    for r in rows:
        oc = r["outcome_classes"]
        trio = lambda d: f"{d['all_solved']:.2f} / {d['all_failed']:.2f} / {d['mixed']:.2f}"  # noqa: E731
        em = lambda d: f"{d['all']:.3f}; " + ", ".join(f"{k}: {v:.2f}" for k, v in d.items() if k != "all")  # noqa: E731
        print(f"| {r['seed']} | {r['effective_ratio']:.3f} | {r['reward_mean']:.3f} | {trio(oc['all'])} | "
              + " | ".join(trio(oc[h]) if h in oc else "-" for h in hop_keys)
              + f" | {em(r['val_em_warm_start'])} | {em(r['val_em_after'])} | {r['rl_s']:.0f} | {r['train_wall_s']:.0f} |")
    if len(rows) > 1:
        xs = [r["effective_ratio"] for r in rows]
        print(f"effective ratio over seeds: {statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
