"""Benchmark: the six allocators on the scarce-contrast testbed at equal generated tokens (issue 18 item 4).

Every run starts from the testbed's SFT warm start (`configs/scarce.yaml`, sft.seed 0, cached) and
differs only in the method's overrides and run.seed; every run spends the same generated-token budget
per step (`rollout.token_budget`, default 300 per prompt = 8 chains × the warm start's measured mean
chain of 37.5 tokens), so methods meet at equal measured cost. Methods: uniform GRPO chains, DAPO
dynamic sampling, PCL filtering, Knapsack counts (GRPO advantages), Tree-GRPO and TRACE (tree
advantages); PCL and TRACE score a pool of 4 × B prompts with the same success predictor.

After training, each run's final policy answers every question of the validation, test and heldout
splits greedily; each method is paired with uniform GRPO per seed and question (exact sign test on the
flips, pooled over seeds).

    .venv/bin/python bench/scarce_comparison.py --seeds 0 1 2 --steps 100 --parallel 2
    .venv/bin/python bench/scarce_comparison.py --collect          # tables from finished runs

Runs that already finished (final checkpoint and evaluation written) are kept, not retrained, so an
interrupted invocation continues where it stopped.

Writes runs/scarce-compare/<method>-seed<S>/, runs/scarce-compare/compare.html (`tracerl compare`)
and bench/results/scarce_comparison.json; prints the markdown tables of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _results import fmt  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "scarce.yaml"
SPLITS = ("validation", "test", "heldout")
SRC = [str(REPO / "src")]  # the tracerl source tree every run and evaluation uses (--src)
GRPO = ["algo.advantage=grpo"]
TREE = ["algo.advantage=tree_grpo"]
POOL = ["alloc.pool_factor=4.0"]  # PCL and TRACE: the same candidate pool (configs/trace.yaml's)
METHODS = {
    "uniform": ["rollout.allocator=uniform", *GRPO],
    "dapo": ["rollout.allocator=dapo", *GRPO],
    "pcl": ["rollout.allocator=pcl", *GRPO, *POOL],
    "knapsack": ["rollout.allocator=knapsack", *GRPO],
    "tree_grpo": ["rollout.allocator=tree_grpo", *TREE, "rollout.trees_per_prompt=2", "rollout.expansions=2",
                  "rollout.rounds=1"],
    # configs/trace.yaml's allocation on the testbed
    "trace": ["rollout.allocator=trace", *TREE, *POOL, "alloc.continuations=2", "alloc.cap_root=16",
              "alloc.cap_anchor=4", "alloc.rounds=2", "alloc.stage2_root=true", "alloc.epsilon=0.1"],
}


def command(method: str, seed: int, args, threads: int) -> list[str]:
    run_dir = Path(args.out_dir).resolve() / f"{method}-seed{seed}"
    return [sys.executable, "-m", "tracerl.cli", "train", "--overwrite", "--config", str(CONFIG),
            f"run.dir={run_dir}", f"run.seed={seed}", "sft.seed=0", f"run.threads={threads}",
            f"trainer.steps={args.steps}", f"trainer.eval_every={args.eval_every}",
            f"trainer.checkpoint_every={args.steps}", "trainer.progress=false", "trainer.tensorboard=false",
            f"rollout.token_budget={args.budget}", *METHODS[method], *args.overrides]


def finished(run_dir: Path, steps: int) -> bool:
    """The run reached its last step and wrote its final checkpoint and evaluation."""
    return (run_dir / "final_eval.json").is_file() and (run_dir / "checkpoints" / f"step_{steps:06d}").is_dir()


def train(method: str, seed: int, args, threads: int) -> float | None:
    """Train one run (None: it had already finished, e.g. in an earlier invocation; not retrained)."""
    out = Path(args.out_dir).resolve()
    if finished(out / f"{method}-seed{seed}", args.steps):
        print(f"{method}-seed{seed}: finished before, kept", flush=True)
        return None
    log = out / f"{method}-seed{seed}.log"
    t0 = time.time()
    with open(log, "w") as f:
        subprocess.run(command(method, seed, args, threads), check=True, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                       env={**os.environ, "PYTHONPATH": SRC[0]})
    wall = time.time() - t0
    (out / f"{method}-seed{seed}.wall").write_text(f"{wall:.1f}\n")
    return wall


def final_model(run_dir: Path) -> Path:
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    if not ckpts:
        raise SystemExit(f"{run_dir}: no checkpoint (did the run finish?)")
    return ckpts[-1] / "model"


def answers(run_dir: Path, splits=SPLITS) -> dict[str, list[float]]:
    """Greedy correctness (1/0) of the run's final policy on every question of each split, in split order
    (`bench/paired_eval.py`'s per-question answers)."""
    sys.path.insert(0, SRC[0])
    from paired_eval import answers as per_question
    from tracerl.config import load_config
    from tracerl.setup import apply_threads, build_env

    cfg = load_config(str(run_dir / "config.yaml"))
    apply_threads(cfg)
    env = build_env(cfg)
    return {split: per_question(str(final_model(run_dir)), env, env.tasks(split), cfg) for split in splits}


def sign_test(up: int, down: int) -> float:
    """Exact two-sided sign test p-value for `up` vs `down` flips (ties dropped)."""
    n = up + down
    if n == 0:
        return 1.0
    k = min(up, down)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def summarise(run_dir: Path, budget: int, prompts: int) -> dict:
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    evals = [json.loads(x) for x in open(run_dir / "eval.jsonl")]
    mean = lambda k, rs=rows: statistics.mean(r.get(k, 0.0) for r in rs)  # noqa: E731
    step_budget = budget * prompts
    over = [r["gen_tokens"] - step_budget for r in rows]
    # within one trajectory: budget ≤ spent ≤ budget + the last wave's longest trajectory
    outside = [r["step"] for r, o in zip(rows, over) if not 0 <= o <= r.get("budget_last_wave_max", 0)]
    gen = sum(r["gen_tokens"] for r in rows)
    return {"steps": rows[-1]["step"], "eval_curve": [(e["step"], e["em"]) for e in evals],
            "em_start": evals[0]["em"], "em_final": evals[-1]["em"],
            "effective_ratio": mean("effective_ratio"), "effective_ratio_first20": mean("effective_ratio", rows[:20]),
            "effective_ratio_last20": mean("effective_ratio", rows[-20:]),
            "mixed_anchors": mean("mixed_anchors"), "leaves": mean("leaves"),
            # prompts with both outcomes per step, and their share of the groups generated (DAPO generates
            # groups it then drops: its effective_ratio is over the kept ones)
            "mixed_prompts": statistics.mean(r["effective_ratio"] * r["prompts_used"] for r in rows),
            "effective_ratio_generated": statistics.mean(
                r["dapo_groups_kept"] / r["dapo_groups_generated"] if r.get("dapo_groups_generated") else
                r["effective_ratio"] for r in rows),
            "train_reward_first20": mean("reward_mean", rows[:20]), "train_reward_last20": mean("reward_mean", rows[-20:]),
            "gen_tokens_per_step": gen / len(rows), "overshoot_mean": statistics.mean(over),
            "overshoot_min": min(over), "overshoot_max": max(over), "steps_outside_one_trajectory": outside,
            "cum_gen_tokens": rows[-1]["cum_gen_tokens"], "rollout_s_per_step": mean("rollout_s"),
            "update_s_per_step": mean("update_s"), "rollout_s_per_1k_tokens": 1000 * sum(r["rollout_s"] for r in rows) / gen,
            "gen_waves": mean("gen_waves"),
            "predictor_auroc": statistics.mean([r["predictor_auroc"] for r in rows if "predictor_auroc" in r] or [math.nan])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--budget", type=int, default=300, help="generated tokens per prompt per step")
    ap.add_argument("--parallel", type=int, default=2, help="runs at once (1 thread each)")
    ap.add_argument("--out-dir", default=str(REPO / "runs" / "scarce-compare"))
    ap.add_argument("--results", default=str(REPO / "bench" / "results" / "scarce_comparison.json"))
    ap.add_argument("--collect", action="store_true", help="do not train: summarise finished runs")
    ap.add_argument("--src", default=str(REPO / "src"),
                    help="tracerl source tree the runs use (PYTHONPATH; e.g. a frozen copy while you edit src/)")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run (after --)")
    args = ap.parse_args()
    SRC[0] = str(Path(args.src).resolve())
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    walls = {}
    if not args.collect:
        with ThreadPoolExecutor(args.parallel) as pool:
            for (m, s), w in zip(jobs, pool.map(lambda j: train(j[0], j[1], args, 1), jobs)):
                walls[(m, s)] = w
    prompts = 8  # configs/scarce.yaml's rollout.prompts_per_step (the quickstart's)
    runs = {}
    for m, s in jobs:
        d = out / f"{m}-seed{s}"
        wall_file = out / f"{m}-seed{s}.wall"
        runs[(m, s)] = {"method": m, "seed": s, **summarise(d, args.budget, prompts),
                        "wall_s": walls.get((m, s)) or (float(wall_file.read_text()) if wall_file.exists() else None)}
    # per-question answers on every split (answered in parallel, one process per run)
    with ThreadPoolExecutor(args.parallel) as pool:
        done = list(pool.map(lambda j: answers_subprocess(out / f"{j[0]}-seed{j[1]}"), jobs))
    for j, a in zip(jobs, done):
        runs[j]["answers"] = a
        runs[j].update({f"em_{sp}": statistics.mean(v) for sp, v in a.items()})
    paired = {}
    for m in args.methods:
        if m == "uniform" or "uniform" not in args.methods:
            continue
        for sp in SPLITS:
            up = down = 0
            for s in args.seeds:
                for b, a in zip(runs[("uniform", s)]["answers"][sp], runs[(m, s)]["answers"][sp]):
                    up, down = up + (a > b), down + (a < b)
            paired[f"{m}/{sp}"] = {"up": up, "down": down, "p": sign_test(up, down)}
    Path(args.results).write_text(json.dumps({"budget": args.budget, "steps": args.steps, "seeds": args.seeds,
                                              "overrides": args.overrides, "runs": list(runs.values()),
                                              "paired_vs_uniform": paired}, indent=1))
    subprocess.run([sys.executable, "-m", "tracerl.cli", "compare", *[str(out / f"{m}-seed{s}") for m, s in jobs],
                    "--out", str(out / "compare.html")], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": SRC[0]})
    by = lambda m, k: [runs[(m, s)][k] for s in args.seeds]  # noqa: E731
    print("| method | effective ratio (all / steps 1–20 / last 20) | over generated groups | mixed prompts/step | "
          "mixed anchors/step | train reward first / last 20 | "
          "val EM | test EM | heldout EM | rollout s / 1k tokens | s / step (rollout + update) | predictor AUROC |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in args.methods:
        print(f"| {m} | {fmt(by(m, 'effective_ratio'))} / {fmt(by(m, 'effective_ratio_first20'))} / "
              f"{fmt(by(m, 'effective_ratio_last20'))} | {fmt(by(m, 'effective_ratio_generated'))} | "
              f"{fmt(by(m, 'mixed_prompts'), 2)} | {fmt(by(m, 'mixed_anchors'), 1)} | "
              f"{fmt(by(m, 'train_reward_first20'))} / {fmt(by(m, 'train_reward_last20'))} | "
              f"{fmt(by(m, 'em_validation'))} | {fmt(by(m, 'em_test'))} | {fmt(by(m, 'em_heldout'))} | "
              f"{fmt(by(m, 'rollout_s_per_1k_tokens'), 2)} | "
              f"{fmt([r + u for r, u in zip(by(m, 'rollout_s_per_step'), by(m, 'update_s_per_step'))], 2)} | "
              f"{fmt(by(m, 'predictor_auroc'))} |")
    print("\n| method | gen tokens / step (budget %d) | overshoot mean / min / max | steps outside one trajectory |" %
          (args.budget * prompts))
    print("|---|---|---|---|")
    for m in args.methods:
        rs = [runs[(m, s)] for s in args.seeds]
        print(f"| {m} | {fmt([r['gen_tokens_per_step'] for r in rs], 0)} | "
              f"{statistics.mean(r['overshoot_mean'] for r in rs):.0f} / {min(r['overshoot_min'] for r in rs)} / "
              f"{max(r['overshoot_max'] for r in rs)} | {sum(len(r['steps_outside_one_trajectory']) for r in rs)} "
              f"of {sum(r['steps'] for r in rs)} |")
    print("\n| method vs uniform (pooled over seeds) | validation up / down, p | test up / down, p | heldout up / down, p |")
    print("|---|---|---|---|")
    for m in args.methods:
        if f"{m}/validation" in paired:
            print(f"| {m} | " + " | ".join(f"{paired[f'{m}/{sp}']['up']} / {paired[f'{m}/{sp}']['down']}, "
                                           f"{paired[f'{m}/{sp}']['p']:.3f}" for sp in SPLITS) + " |")


def answers_subprocess(run_dir: Path) -> dict[str, list[float]]:
    """`answers` in a child process with one torch thread (so two can run side by side)."""
    cache = run_dir / "answers.json"
    if cache.exists() and cache.stat().st_mtime > final_model(run_dir).stat().st_mtime:
        return json.loads(cache.read_text())
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, 'bench'); "
            f"import scarce_comparison as sc; sc.SRC[0] = {SRC[0]!r}; from scarce_comparison import answers; "
            f"Path({str(cache)!r}).write_text(json.dumps(answers(Path({str(run_dir)!r}))))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": SRC[0], "OMP_NUM_THREADS": "1"})
    return json.loads(cache.read_text())


if __name__ == "__main__":
    sys.exit(main())
