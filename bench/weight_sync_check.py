"""Check: after a weight sync the vLLM engine samples the new weights, whatever engine.weight_sync carries them.

Run by bench/vllm_smoke.sh, once per mode, each in its own process; then `--compare` checks the modes
against the file path (docs/engines.md §3):

    python bench/weight_sync_check.py MODEL_DIR --mode file --out file.json               # GPU, cuda:0
    python bench/weight_sync_check.py MODEL_DIR --mode ipc --out ipc.json                 # same GPU, CUDA IPC
    python bench/weight_sync_check.py MODEL_DIR --mode nccl --engine-device cuda:1 --out nccl.json
    python bench/weight_sync_check.py --compare file.json ipc.json nccl.json
    python bench/weight_sync_check.py MODEL_DIR --mode file --cpu --out file.json         # CPU, in-process engine

One run: start the engine (fp32, eager) on MODEL_DIR, generate greedily from 8 prompts of the built-in
world (4 short, 4 of ~300 tokens, so the prefix cache holds blocks of the old weights), perturb the
trainer's copy of the weights with seeded noise, sync them (`load_weights`), generate again, sync the
original weights back and then the perturbed ones again (the transfer is set up once and reused), and
write the tokens, log-probs and sync seconds. A run fails when a sync leaves the outputs unchanged or
the round trip does not give the first outputs back; --compare fails when a mode's outputs after the
sync differ from the file path's (tokens equal, log-probs within --tol).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")


def _prompts(tok) -> list[list[int]]:
    from tracerl.envs import make_env
    from tracerl.rollout import encode_prompt

    env = make_env("multihop", seed=0)
    short = [encode_prompt(tok, env, t, "none") for t in env.tasks("train")[:12]]
    flat = [i for p in short for i in p]
    return short[:4] + [flat[j * 7: j * 7 + 300] for j in range(4)]


def run(args) -> dict:
    import torch

    from tracerl.backends.base import SamplingParams
    from tracerl.backends.hf import HFPolicy
    from tracerl.backends.vllm_engine import VLLMPolicy
    from tracerl.config import EngineConfig
    from tracerl.models.io import load_policy

    device = "cpu" if args.cpu else args.device
    model, tok = load_policy(args.model)
    model = model.to(device).eval()
    cfg = EngineConfig(name="vllm", weight_sync=args.mode, device=None if args.cpu else args.engine_device,
                       in_process=args.cpu, gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_mb=256)
    engine = VLLMPolicy(args.model, tok, 1024, cfg, device, seed=0, dtype="float32")
    prompts, greedy = _prompts(tok), SamplingParams(16, 0.0, 1.0, ())

    def sample(version: int) -> dict:
        gens, _ = engine.generate(prompts, greedy)
        assert {g.version for g in gens} == {version}
        return {"tokens": [g.token_ids for g in gens], "logprobs": [g.logprobs for g in gens]}

    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = sample(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the "update": seeded noise on every matrix (the same on every mode's run)
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.05)
    syncs = []
    for version, state in ((1, model.state_dict()), (2, original), (3, model.state_dict())):
        t0 = time.perf_counter()
        engine.load_weights(state, version)
        syncs.append(time.perf_counter() - t0)
        out = sample(version)
        if version == 1:
            after = out
        elif version == 2:
            back = out
        else:
            again = out
    hf_after, _ = HFPolicy(model, tok, device, 1024).generate(prompts, greedy)
    problems = []
    if after["tokens"] == before["tokens"]:
        problems.append("the sync left every greedy output unchanged")
    if back["tokens"] != before["tokens"]:
        problems.append("syncing the original weights back did not give the first outputs back")
    if again["tokens"] != after["tokens"]:
        problems.append("the second sync of the same weights gave other outputs than the first")
    return {"mode": args.mode, "device": device, "engine_device": args.engine_device, "before": before,
            "after": after, "sync_s": syncs, "hf_after_tokens": [h.token_ids for h in hf_after],
            "problems": problems}


def compare(paths: list[str], tol: float) -> int:
    runs = [json.load(open(p)) for p in paths]
    ref = next((r for r in runs if r["mode"] == "file"), None)
    if ref is None:
        print("weight_sync_check: FAILED: --compare needs the file run")
        return 1
    bad = 0
    for r in runs:
        hf_equal = sum(a == b for a, b in zip(r["after"]["tokens"], r["hf_after_tokens"]))
        line = (f"weight_sync_check {r['mode']}: sync {min(r['sync_s']):.3f} s (first {r['sync_s'][0]:.3f} s), "
                f"{hf_equal}/{len(r['hf_after_tokens'])} greedy outputs equal to an HF forward of the new weights")
        if r is not ref:
            same = r["after"]["tokens"] == ref["after"]["tokens"]
            err = max((abs(a - b) for x, y in zip(r["after"]["logprobs"], ref["after"]["logprobs"]) for a, b in zip(x, y)),
                      default=0.0)
            line += f"; vs file: tokens {'equal' if same else 'DIFFER'}, max |log-prob diff| {err:.2e}"
            if not same or err > tol:
                r["problems"].append(f"outputs after the sync differ from the file path's (tol {tol})")
        print(line)
        for p in r["problems"]:
            print(f"weight_sync_check: FAILED ({r['mode']}): {p}")
            bad = 1
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", help="model directory (a tracerl warm start or any local HF model)")
    ap.add_argument("--mode", choices=["file", "nccl", "ipc"], default="file")
    ap.add_argument("--device", default="cuda:0", help="the trainer's device (run.device)")
    ap.add_argument("--engine-device", default=None, help="engine.device (nccl: another GPU)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--cpu", action="store_true", help="CPU, in-process engine (file mode only)")
    ap.add_argument("--out", help="where the run's JSON goes")
    ap.add_argument("--compare", nargs="+", metavar="JSON", help="compare runs against the file run")
    ap.add_argument("--tol", type=float, default=1e-5, help="log-prob tolerance of --compare")
    args = ap.parse_args()
    if args.compare:
        return compare(args.compare, args.tol)
    if not args.model or not args.out:
        ap.error("a run needs MODEL_DIR and --out")
    if args.cpu and args.mode != "file":
        ap.error(f"--mode {args.mode} is GPU-only")
    result = run(args)
    with open(args.out, "w") as f:
        json.dump(result, f)
    for p in result["problems"]:
        print(f"weight_sync_check: FAILED ({args.mode}): {p}", file=sys.stderr)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
