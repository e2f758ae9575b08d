"""Benchmark: the README's main job (`tracerl train`, embedded default config) over several seeds.

Each seed is a full, independent quickstart — its own SFT warm start (sft.seed) in a fresh cache and
its own RL run (run.seed) — timed end to end, as `make run` would be on a fresh machine.

    .venv/bin/python bench/quickstart_seeds.py --seeds 0 1 2 [--out bench/results/quickstart.json]

Prints a markdown table (SFT-start validation EM, final validation EM, wall time) with mean ± std.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_seed(seed: int, extra: list[str], runs_dir: Path) -> dict:
    cache = tempfile.mkdtemp(prefix=f"tracerl-bench-{seed}-")  # fresh: the SFT time is included
    env = {**os.environ, "TRACERL_CACHE": cache}
    run_dir = runs_dir / f"quickstart-seed{seed}"
    cmd = [str(REPO / ".venv" / "bin" / "tracerl"), "train", "--overwrite", f"run.dir={run_dir}",
           f"run.seed={seed}", f"sft.seed={seed}", "trainer.progress=false", *extra]
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    wall = time.time() - t0
    evals = [json.loads(line) for line in open(run_dir / "eval.jsonl")]
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    sft_meta = json.loads(next(Path(cache).glob("sft/*/sft_meta.json")).read_text())
    return {"seed": seed, "wall_s": round(wall, 1), "sft_s": sft_meta["seconds"],
            "rl_s": round(sum(m["rollout_s"] + m["update_s"] for m in metrics), 1),
            "em_start": evals[0]["em"], "em_final": evals[-1]["em"], "f1_final": evals[-1]["f1"],
            "eval_curve": [(e["step"], e["em"]) for e in evals],
            "steps": metrics[-1]["step"], "cum_gen_tokens": metrics[-1]["cum_gen_tokens"],
            "train_reward_first10": statistics.mean(m["reward_mean"] for m in metrics[:10]),
            "train_reward_last10": statistics.mean(m["reward_mean"] for m in metrics[-10:]),
            "eff_ratio_first10": statistics.mean(m["effective_ratio"] for m in metrics[:10]),
            "eff_ratio_last10": statistics.mean(m["effective_ratio"] for m in metrics[-10:])}


def fmt(xs: list[float], digits: int = 3) -> str:
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else f"{xs[0]:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "quickstart.json"))
    ap.add_argument("--runs-dir", default=str(REPO / "runs"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = [run_seed(s, args.overrides, Path(args.runs_dir)) for s in args.seeds]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("| seed | SFT-start val EM | final val EM | final val F1 | train reward first/last 10 steps | effective ratio first/last 10 | SFT s | RL s | total wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['em_start']:.3f} | {r['em_final']:.3f} | {r['f1_final']:.3f} | "
              f"{r['train_reward_first10']:.3f} / {r['train_reward_last10']:.3f} | "
              f"{r['eff_ratio_first10']:.2f} / {r['eff_ratio_last10']:.2f} | {r['sft_s']:.0f} | {r['rl_s']:.0f} | {r['wall_s']:.0f} |")
    print(f"| mean ± std | {fmt([r['em_start'] for r in rows])} | {fmt([r['em_final'] for r in rows])} | "
          f"{fmt([r['f1_final'] for r in rows])} | | | {fmt([r['sft_s'] for r in rows], 0)} | "
          f"{fmt([r['rl_s'] for r in rows], 0)} | {fmt([r['wall_s'] for r in rows], 0)} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
