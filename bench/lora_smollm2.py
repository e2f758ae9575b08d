"""LoRA vs full fine-tuning on the SmolLM2-135M-Instruct preset (BENCHMARKS §16): trainable parameters,
peak RSS and step time of a few real training steps each.

Each setting runs in its own process (peak RSS is the process's `ru_maxrss`; CPU time, all threads, is
reported beside wall time because a shared machine inflates the latter), with the same prompts,
sampling seed and sizes; `algo.kl_coef` > 0, so full fine-tuning holds a second, frozen copy as the KL
reference while LoRA's reference is the base with the adapters off. The steps have an entropy bonus, so
every step updates the weights even when all sampled rewards are equal.

    .venv/bin/python bench/lora_smollm2.py --steps 3 --json

Needs `pip install 'tracerl[lora]'` and the converted SmolLM2 cache (`TRACERL_CACHE`, made on first use).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _results import save_result  # noqa: E402

WORLD = {"n_entities": 100, "train_size": 120, "validation_size": 16, "test_size": 16, "heldout_size": 16}
BASE = [
    "model.preset=smollm2-135m", "env.max_turns=2", *(f"env.options.{k}={v}" for k, v in WORLD.items()),
    "env.options.hop_mix={1: 1.0}", "rollout.prompts_per_step=2", "rollout.group_size=2",
    "rollout.max_turn_tokens=16", "trainer.micro_batch_size=4", "trainer.lr=1e-5", "trainer.warmup_steps=0",
    "trainer.tensorboard=false", "algo.kl_coef=0.001", "algo.entropy_coef=0.01", "algo.skip_uniform_groups=false",
]
SETTINGS = {
    "full": [],
    "lora_r8_qkvo": ["lora.enabled=true", "lora.rank=8", "lora.alpha=16"],
    "lora_r16_all_linear": ["lora.enabled=true", "lora.rank=16", "lora.alpha=32", "lora.target_modules=all-linear"],
}


def child(setting: str, steps: int, threads: int) -> dict:
    """One setting in this process: set-up, `steps` training steps, the process's peak RSS."""
    import torch

    from tracerl.config import load_config
    from tracerl.models.lora import trainable_parameters
    from tracerl.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [*BASE, *SETTINGS[setting], f"run.dir={tmp}/run", f"run.threads={threads}"])
        t0 = time.perf_counter()
        tr = Trainer(cfg, log=lambda *_: None)
        tr.setup()
        setup_s = time.perf_counter() - t0
        trainable, total = trainable_parameters(tr.model)
        rows = []
        for step in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            m = tr.train_step(step)
            rows.append({"step_s": time.perf_counter() - t0, "step_cpu_s": time.process_time() - c0, "rollout_s": m["rollout_s"], "update_s": m["update_s"],
                         "grad_norm": m["grad_norm"], "train_tokens": m["train_tokens"]})
        assert all(r["grad_norm"] > 0 for r in rows), rows
        tr.release()
    med = {k: statistics.median(r[k] for r in rows) for k in ("step_s", "step_cpu_s", "rollout_s", "update_s")}
    return {"setting": setting, "trainable_params": trainable, "total_params": total,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "setup_s": setup_s,
            **{f"median_{k}": v for k, v in med.items()}, "steps": rows, "torch_threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "lora_smollm2.json"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.threads)))
        return
    results = []
    for setting in args.settings.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", setting, "--steps", str(args.steps),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{setting} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{setting:22s} trainable {r['trainable_params']:>11,} of {r['total_params']:,}  peak RSS "
              f"{r['peak_rss_gib']:.2f} GiB  step {r['median_step_s']:.1f} s, CPU {r['median_step_cpu_s']:.1f} s (rollout {r['median_rollout_s']:.1f}, "
              f"update {r['median_update_s']:.2f})", flush=True)
    save_result({"command": " ".join(sys.argv), "steps": args.steps, "results": results}, args.out, args.json)


if __name__ == "__main__":
    main()
