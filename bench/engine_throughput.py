"""Benchmark: rollout throughput of the HF backend vs vLLM, chains and Tree-GRPO trees, and weight-sync time.

Runs in the vLLM environment (`make setup-vllm`):

    .venv-vllm/bin/python bench/engine_throughput.py                  # tiny quickstart warm start + SmolLM2-135M
    .venv-vllm/bin/python bench/engine_throughput.py --models tiny --repeats 1

For each model the quickstart's step is generated on the built-in multi-hop world: 8 prompts × 8 chains
(allocator uniform) and 8 prompts × Tree-GRPO (2 trees, 2 expansions, 1 round) at T = 0.7, max 48 tokens
a turn, with the same agent loop (turns, tool observations) for both backends. Each (model, backend,
layout) is run `--repeats` times after one untimed warm-up; the median rollout seconds per 1k generated
tokens is reported, with the prefix-cache hit rate from vLLM's own counters (prompt tokens found in its
cache / looked up) and the HF backend's share of prompt tokens saved by its KV copy. Then the median time
of `load_weights` (state dict -> safetensors in /dev/shm -> in-place reload -> re-pack -> cache reset)
over 3 updates. vLLM runs in this process (in-process engine core), fp32, eager, 256 MiB KV cache, with
the process's torch threads (default 2).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")

REPO = Path(__file__).resolve().parents[1]


def model_dir(name: str) -> Path:
    from tracerl.config import load_config
    from tracerl.setup import resolve_model_path

    if name == "tiny":
        return resolve_model_path(load_config(None, []))
    return resolve_model_path(load_config(None, ["model.preset=smollm2-135m"]))


def rollout(policy, env, layout: str, seed: int) -> dict:
    import torch

    from tracerl.allocate import ALLOCATORS, AllocationContext
    from tracerl.backends.base import SamplingParams
    from tracerl.config import RolloutConfig
    from tracerl.rollout import RolloutEngine

    params = SamplingParams(48, 0.7, 1.0, tuple(env.stop_strings))
    eng = RolloutEngine(policy, env, params, torch.Generator().manual_seed(seed), "auto", 64)
    cfg = RolloutConfig(allocator=layout, prompts_per_step=8, group_size=8, trees_per_prompt=2, expansions=2, rounds=1)
    tasks = random.Random(seed).sample(env.tasks("train"), 8)
    before = policy.step_metrics() if hasattr(policy, "step_metrics") else {}
    t0 = time.perf_counter()
    ALLOCATORS.get(layout)(AllocationContext(eng, cfg, random.Random(seed)), tasks)
    dt = time.perf_counter() - t0
    after = policy.step_metrics()
    c = eng.cost
    return {"s": dt, "gen_tokens": c.gen_tokens, "s_per_1k": 1000 * dt / max(c.gen_tokens, 1),
            "prefill_saved_share": c.prefill_saved / max(c.prefill_tokens + c.prefill_saved, 1),
            "engine_hit_rate": after.get("engine_cache_hit_rate"), "_": before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "engine_throughput.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from tracerl.backends.hf import HFPolicy
    from tracerl.backends.vllm_engine import VLLMPolicy
    from tracerl.config import EngineConfig, load_config
    from tracerl.models.io import load_policy
    from tracerl.setup import build_env

    results = []
    for name in args.models:
        cfg = load_config(None, [] if name == "tiny" else ["model.preset=smollm2-135m"])
        env = build_env(cfg)
        d = model_dir(name)
        model, tok = load_policy(d)
        model.eval()
        backends = {"hf": HFPolicy(model, tok, "cpu", cfg.model.max_context)}
        t0 = time.perf_counter()
        backends["vllm"] = VLLMPolicy(d, tok, cfg.model.max_context, EngineConfig(name="vllm", in_process=True), "cpu")
        start_s = time.perf_counter() - t0
        for layout in ("uniform", "tree_grpo"):
            for bname, pol in backends.items():
                rollout(pol, env, layout, 100)  # warm-up
                runs = [rollout(pol, env, layout, 101 + k) for k in range(args.repeats)]
                row = {"model": name, "backend": bname, "layout": layout,
                       "s_per_1k_tokens": statistics.median(r["s_per_1k"] for r in runs),
                       "tokens_per_s": statistics.median(r["gen_tokens"] / r["s"] for r in runs),
                       "gen_tokens": statistics.median(r["gen_tokens"] for r in runs),
                       "prefill_saved_share": statistics.median(r["prefill_saved_share"] for r in runs),
                       "engine_hit_rate": statistics.median(r["engine_hit_rate"] for r in runs) if bname == "vllm" else None}
                results.append(row)
                print(json.dumps(row), flush=True)
        sync = []
        state = model.state_dict()
        for v in range(3):
            backends["vllm"].load_weights(state, v + 1)
            sync.append(backends["vllm"].last_sync_s)
        row = {"model": name, "engine_start_s": start_s, "sync_s_median": statistics.median(sync),
               "params": sum(p.numel() for p in model.parameters())}
        results.append(row)
        print(json.dumps(row), flush=True)
        del backends
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1))


if __name__ == "__main__":
    main()
