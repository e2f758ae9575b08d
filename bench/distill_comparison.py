"""Benchmark: routed self-distillation against its baselines at equal steps, several seeds, two environments.

Methods (docs/distillation.md §9): GRPO (distill.mode=off), all-token self-distillation (forward KL on every
generated token plus the PG term), routed with rule annotation, routed with self-annotation (the policy
as a JSON annotator). Every run of an environment starts from the same SFT warm start (sft.seed 0,
cached after the first run) and differs only in the method and run.seed; all runs take the same
number of steps with the same rollouts per step, so the comparison is at equal steps (the teacher
pass and annotation are extra compute, reported as their share of the step time).

    python bench/distill_comparison.py --seeds 0 1 2 --parallel 2                      # the full comparison
    python bench/distill_comparison.py --seeds 0 --envs arith --methods grpo routed_rule -- trainer.steps=5

Writes OUT_DIR/<env>-<method>-seed<S>/ run directories and bench/results/distill_comparison.json;
prints a markdown table: final validation EM mean ± std over seeds, the teacher-pass share of step time,
the annotation share, the share of generated tokens routed to KL and the annotator's invalid rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _results import fmt  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]

ENVS = {"multihop": [], "arith": ["--config", str(REPO / "configs" / "arith.yaml")]}
METHODS = {
    "grpo": ["distill.mode=off"],
    "all_tokens": ["distill.mode=all_tokens"],
    "routed_rule": ["distill.mode=routed", "distill.annotator=rule"],
    "routed_self": ["distill.mode=routed", "distill.annotator=self"],
    "routed_rule_rkl": ["distill.mode=routed", "distill.annotator=rule", "distill.reverse_kl_on_errors=true"],
}


def command(env: str, method: str, seed: int, threads: int, out_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "tracerl.cli", "train", *ENVS[env], "--overwrite",
            f"run.dir={out_dir / f'{env}-{method}-seed{seed}'}", f"run.seed={seed}", "sft.seed=0",
            f"run.threads={threads}", "trainer.progress=false", "trainer.tensorboard=false", *METHODS[method], *extra]


def run(env: str, method: str, seed: int, threads: int, out_dir: Path, extra: list[str]) -> dict:
    t0 = time.time()
    penv = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    with open(out_dir / f"{env}-{method}-seed{seed}.log", "w") as log:
        subprocess.run(command(env, method, seed, threads, out_dir, extra), check=True, cwd=REPO, stdout=log,
                       stderr=subprocess.STDOUT, env=penv)
    return collect(env, method, seed, out_dir, time.time() - t0)


def collect(env: str, method: str, seed: int, out_dir: Path, wall: float | None = None) -> dict:
    """The summary of a finished run directory."""
    run_dir = out_dir / f"{env}-{method}-seed{seed}"
    evals = [json.loads(x) for x in open(run_dir / "eval.jsonl")]
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    step_s = sum(r["rollout_s"] + r["update_s"] for r in rows)
    on = [r for r in rows if r.get("distill_weight", 0) > 0]  # steps where the KL channel was active

    def mean_on(k: str) -> float | None:
        vals = [r[k] for r in on if k in r]
        return statistics.mean(vals) if vals else None

    return {"env": env, "method": method, "seed": seed, "wall_s": None if wall is None else round(wall, 1),
            "steps": rows[-1]["step"], "em_start": evals[0]["em"], "em_final": evals[-1]["em"],
            "f1_final": evals[-1]["f1"], "eval_curve": [(e["step"], e["em"]) for e in evals],
            "train_reward_first5": statistics.mean(r["reward_mean"] for r in rows[:5]),
            "train_reward_last5": statistics.mean(r["reward_mean"] for r in rows[-5:]),
            "step_s_mean": step_s / len(rows), "update_s_mean": statistics.mean(r["update_s"] for r in rows),
            "teacher_s_total": sum(r.get("teacher_s", 0.0) for r in rows),
            "teacher_share": sum(r.get("teacher_s", 0.0) for r in rows) / step_s,
            "teacher_share_active": (sum(r.get("teacher_s", 0.0) for r in on) /
                                     sum(r["rollout_s"] + r["update_s"] for r in on)) if on else 0.0,
            "annotate_share": sum(r.get("annotate_s", 0.0) for r in rows) / step_s,
            "steps_distilled": len(on), "kl_token_frac": mean_on("key_token_frac"),
            "kl_key": mean_on("kl_key"), "annotator_invalid_rate": mean_on("annotator_invalid_rate"),
            "teacher_rows": mean_on("teacher_rows"), "trained_trajectories": statistics.mean(r.get("trained_trajectories", 0) for r in rows)}


def warm_start_cached(env: str, overrides: list[str]) -> bool:
    """Whether the SFT warm start every run of `env` starts from is already in the cache."""
    sys.path.insert(0, str(REPO / "src"))
    from tracerl.config import load_config
    from tracerl.sft import sft_dir

    config = ENVS[env][1] if ENVS[env] else None
    return (sft_dir(load_config(config, ["sft.seed=0", *overrides])) / "sft_meta.json").is_file()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS))
    ap.add_argument("--methods", nargs="+", default=["grpo", "all_tokens", "routed_rule", "routed_self"],
                    choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--parallel", type=int, default=1, help="runs at once (threads split between them)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores / parallel)")
    ap.add_argument("--out-dir", default="runs/distill")
    ap.add_argument("--results", default=str(REPO / "bench" / "results" / "distill_comparison.json"))
    ap.add_argument("--collect", action="store_true", help="do not train: summarise the run directories under --out-dir")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run (after --)")
    args = ap.parse_args()
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.parallel)
    jobs = [(e, m, s) for e in args.envs for s in args.seeds for m in args.methods]
    if args.collect:
        results = [collect(*j, out_dir) for j in jobs]
    else:
        # one run per environment first, alone, when its SFT warm start is not cached yet: it builds it and
        # the others reuse it (parallel runs would wait on its lock anyway)
        firsts = {e: next(j for j in jobs if j[0] == e) for e in args.envs if not warm_start_cached(e, args.overrides)}
        results = [run(*j, args.threads or threads * args.parallel, out_dir, args.overrides) for j in firsts.values()]
        rest = [j for j in jobs if j not in firsts.values()]
        with ThreadPoolExecutor(args.parallel) as pool:
            results += list(pool.map(lambda j: run(*j, threads, out_dir, args.overrides), rest))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps({"overrides": args.overrides, "parallel": args.parallel,
                                              "runs": results}, indent=1))
    print("| env | method | seeds | val EM start | val EM final | train reward first/last 5 | step s | "
          "teacher share (all / KL-active steps) | annotate share | KL token share | annotator invalid |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for e in args.envs:
        for m in args.methods:
            rs = [r for r in results if r["env"] == e and r["method"] == m]
            print(f"| {e} | {m} | {len(rs)} | {fmt([r['em_start'] for r in rs])} | {fmt([r['em_final'] for r in rs])} | "
                  f"{fmt([r['train_reward_first5'] for r in rs], 2)} / {fmt([r['train_reward_last5'] for r in rs], 2)} | "
                  f"{fmt([r['step_s_mean'] for r in rs], 1)} | {fmt([r['teacher_share'] for r in rs], 3)} / "
                  f"{fmt([r['teacher_share_active'] for r in rs], 3)} | {fmt([r['annotate_share'] for r in rs], 3)} | "
                  f"{fmt([r['kl_token_frac'] for r in rs], 3)} | {fmt([r['annotator_invalid_rate'] for r in rs], 2)} |")


if __name__ == "__main__":
    sys.exit(main())
