"""Benchmark: the quickstart on 1 process vs N torchrun processes (gloo, 1 thread each).

    .venv/bin/python bench/scaling.py --steps 100 --seeds 0 1 --procs 1 2 [--out bench/results/scaling.json]

Each (processes, seed) pair is one `tracerl train` of the embedded default with `run.threads=1` (the
SFT warm start is the cached one), N processes through `torchrun --standalone`. Reported per run:
steps per minute of the training loop (rollout + update, the slowest rank's), the process wall time,
the mean training reward over the last quarter of the steps and the final validation EM; then, per
process count, mean ± std over seeds. Processes share prompts (prompts_per_step / N each) and the
global batch is the same size, so the curves should agree within the seed spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(procs: int, seed: int, steps: int, runs_dir: Path, extra: list[str]) -> dict:
    run_dir = runs_dir / f"procs{procs}-seed{seed}"
    launcher = [sys.executable, "-m", "tracerl.cli"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "tracerl.cli"]
    cmd = [*launcher, "train", "--overwrite", f"run.dir={run_dir}", f"run.seed={seed}", "run.threads=1",
           f"trainer.steps={steps}", f"trainer.eval_every={steps // 2}", f"trainer.checkpoint_every={steps}",
           "trainer.progress=false", "trainer.tensorboard=false", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    evals = [json.loads(line) for line in open(run_dir / "eval.jsonl")]
    loop_s = sum(m["rollout_s"] + m["update_s"] for m in metrics)
    tail = metrics[-max(1, steps // 4):]
    return {"procs": procs, "seed": seed, "steps": steps, "wall_s": round(wall, 1), "loop_s": round(loop_s, 1),
            "steps_per_min": round(60 * steps / loop_s, 2), "rollout_s": round(sum(m["rollout_s"] for m in metrics), 1),
            "update_s": round(sum(m["update_s"] for m in metrics), 1),
            "reward_last_quarter": round(statistics.mean(m["reward_mean"] for m in tail), 4),
            "em_start": evals[0]["em"], "em_final": evals[-1]["em"],
            "reward_curve": [round(m["reward_mean"], 4) for m in metrics]}


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs-dir", default="runs/bench-scaling")
    ap.add_argument("--out", default="bench/results/scaling.json")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = ap.parse_args()
    rows = [run(p, s, args.steps, REPO / args.runs_dir, args.overrides) for s in args.seeds for p in args.procs]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    print("| processes | steps/min (loop) | wall s | reward, last quarter | val EM start → final |")
    print("|---|---|---|---|---|")
    for p in args.procs:
        mine = [r for r in rows if r["procs"] == p]
        print(f"| {p} | {mean_std([r['steps_per_min'] for r in mine])} | {mean_std([r['wall_s'] for r in mine])} | "
              f"{mean_std([r['reward_last_quarter'] for r in mine])} | {mine[0]['em_start']:.3f} → "
              f"{mean_std([r['em_final'] for r in mine])} |")


if __name__ == "__main__":
    main()
