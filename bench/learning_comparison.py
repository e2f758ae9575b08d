"""Benchmark: learning comparison of methods at equal generated-token budget, several seeds.

Every run starts from the same quickstart SFT warm start (sft.seed 0, taken from the cache) and
differs only in the method's overrides and run.seed. Each prompt gets the same generated-token
budget per step (`rollout.token_budget`, default: 8 chains x the measured mean chain length of the
SFT policy, see `tracerl calibrate`), so methods are compared at equal measured cost; the table also
reports the cost each run really spent.

    .venv/bin/python bench/learning_comparison.py --seeds 0 1 2 --parallel 2 --out-dir runs/compare
    .venv/bin/python bench/learning_comparison.py --methods chains tree --seeds 0 -- trainer.steps=10

Writes OUT_DIR/<method>-seed<S>/ run directories, OUT_DIR/compare.html (`tracerl compare`), and
bench/results/learning_comparison.json; prints a markdown table (final validation EM mean ± std).
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
TRACERL = str(REPO / ".venv" / "bin" / "tracerl")

METHODS = {
    "chains": ["rollout.allocator=uniform", "algo.advantage=grpo"],
    "tree": ["rollout.allocator=tree_grpo", "algo.advantage=tree_grpo", "rollout.trees_per_prompt=2",
             "rollout.expansions=2", "rollout.rounds=1"],
    "tree-grpo-adv": ["rollout.allocator=tree_grpo", "algo.advantage=grpo", "rollout.trees_per_prompt=2",
                      "rollout.expansions=2", "rollout.rounds=1"],
    # TRACE (configs/trace.yaml): predictor-guided Stage 1 root counts over a 4x pool + Stage 2 continuations in 2 rounds
    "trace": ["--config", "configs/trace.yaml"],
    "tree-treepo": ["rollout.allocator=tree_grpo", "algo.advantage=treepo", "rollout.trees_per_prompt=2",
                    "rollout.expansions=2", "rollout.rounds=1"],
}


def command(method: str, seed: int, budget: int, threads: int, out_dir: Path, extra: list[str]) -> list[str]:
    method_args = METHODS[method]
    config = method_args[:2] if method_args[:1] == ["--config"] else []
    return [TRACERL, "train", *config, "--overwrite", f"run.dir={out_dir / f'{method}-seed{seed}'}", f"run.seed={seed}",
            "sft.seed=0", f"run.threads={threads}", "trainer.progress=false", f"rollout.token_budget={budget}",
            *method_args[len(config):], *extra]


def run(method: str, seed: int, budget: int, threads: int, out_dir: Path, extra: list[str],
        reuse: bool = False) -> dict:
    """Train one run, or with `reuse`, collect a finished run made by the very same command (another
    benchmark's baseline runs, say); the command of each finished run is kept in <run>.cmd.json."""
    cmd = command(method, seed, budget, threads, out_dir, extra)
    done = out_dir / f"{method}-seed{seed}.cmd.json"
    same = lambda a, b: [x for x in a if not x.startswith("run.threads=")] == \
        [x for x in b if not x.startswith("run.threads=")]  # noqa: E731 (threads change float rounding only)
    if reuse and done.is_file() and (out_dir / f"{method}-seed{seed}" / "final_eval.json").is_file():
        saved = json.loads(done.read_text())
        if same(saved["cmd"], cmd):
            print(f"reusing {method}-seed{seed} (finished with the same command)", flush=True)
            return collect(method, seed, out_dir, saved["wall_s"])
    t0 = time.time()
    with open(out_dir / f"{method}-seed{seed}.log", "w") as log:
        subprocess.run(cmd, check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    done.write_text(json.dumps({"cmd": cmd, "wall_s": wall}))
    return collect(method, seed, out_dir, wall)


def collect(method: str, seed: int, out_dir: Path, wall: float | None = None) -> dict:
    """The summary of a finished run directory (wall time from its own step timings if not measured)."""
    run_dir = out_dir / f"{method}-seed{seed}"
    evals = [json.loads(x) for x in open(run_dir / "eval.jsonl")]
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    mean = lambda k: statistics.mean(r.get(k, 0.0) for r in rows)  # noqa: E731
    # predictor calibration, over the steps where it was measured (allocators with a predictor only)
    calib = lambda k: (statistics.mean(r[k] for r in rows if k in r)  # noqa: E731
                       if any(k in r for r in rows) else None)
    if wall is None:
        wall = sum(r["rollout_s"] + r["update_s"] for r in rows)
    return {"method": method, "seed": seed, "wall_s": round(wall, 1), "em_start": evals[0]["em"],
            "em_final": evals[-1]["em"], "f1_final": evals[-1]["f1"],
            "eval_curve": [(e["step"], e["em"]) for e in evals], "steps": rows[-1]["step"],
            "cum_gen_tokens": rows[-1]["cum_gen_tokens"], "leaves_per_step": mean("leaves"),
            "effective_ratio": mean("effective_ratio"), "mixed_anchors": mean("mixed_anchors"),
            "prefill_saved_per_step": mean("prefill_saved"), "continuation_fraction": mean("continuation_fraction"),
            "rollout_s_per_step": mean("rollout_s"), "update_s_per_step": mean("update_s"),
            "train_reward_first10": statistics.mean(r["reward_mean"] for r in rows[:10]),
            "train_reward_last10": statistics.mean(r["reward_mean"] for r in rows[-10:]),
            "predictor_ece": calib("predictor_ece"), "predictor_brier": calib("predictor_brier"),
            "predictor_auroc": calib("predictor_auroc")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["chains", "tree"], choices=sorted(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=352, help="generated tokens per prompt per step")
    ap.add_argument("--parallel", type=int, default=1, help="runs at once (threads split between them)")
    ap.add_argument("--out-dir", default="runs/compare")
    ap.add_argument("--results", default=str(REPO / "bench" / "results" / "learning_comparison.json"))
    ap.add_argument("--collect", action="store_true",
                    help="do not train: summarise the finished run directories under --out-dir")
    ap.add_argument("--reuse", action="store_true",
                    help="collect runs already finished under --out-dir with the same command instead of rerunning")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run (after --)")
    args = ap.parse_args()
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // args.parallel)
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    if args.collect:
        results = [collect(m, s, out_dir) for m, s in jobs]
    else:
        with ThreadPoolExecutor(args.parallel) as pool:
            results = list(pool.map(lambda j: run(j[0], j[1], args.budget, threads, out_dir, args.overrides,
                                                 args.reuse), jobs))
    Path(args.results).write_text(json.dumps({"budget": args.budget, "overrides": args.overrides,
                                              "parallel": args.parallel, "runs": results}, indent=1))
    subprocess.run([TRACERL, "compare", *[str(out_dir / f"{m}-seed{s}") for m, s in jobs],
                    "--out", str(out_dir / "compare.html")], check=True, cwd=REPO)
    print("| method | seeds | val EM start | val EM final | F1 final | gen tokens (cum) | leaves/step | "
          "effective ratio | mixed anchors/step | predictor ECE | predictor AUROC | rollout s/step | update s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m in args.methods:
        rs = [r for r in results if r["method"] == m]
        print(f"| {m} | {len(rs)} | {fmt([r['em_start'] for r in rs])} | {fmt([r['em_final'] for r in rs])} | "
              f"{fmt([r['f1_final'] for r in rs])} | {fmt([r['cum_gen_tokens'] for r in rs], 0)} | "
              f"{fmt([r['leaves_per_step'] for r in rs], 1)} | {fmt([r['effective_ratio'] for r in rs])} | "
              f"{fmt([r['mixed_anchors'] for r in rs], 1)} | {fmt([r['predictor_ece'] for r in rs])} | "
              f"{fmt([r['predictor_auroc'] for r in rs])} | {fmt([r['rollout_s_per_step'] for r in rs], 2)} | "
              f"{fmt([r['update_s_per_step'] for r in rs], 2)} |")


if __name__ == "__main__":
    sys.exit(main())
