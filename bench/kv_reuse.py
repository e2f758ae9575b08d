"""Benchmark: KV-prefix reuse vs recomputation when several branches continue one prefix.

A randomly initialised tiny Qwen3 (default: hidden 512, 8 layers, MLP 1792, 2k BPE vocabulary:
about 29M parameters) gets one random prefix (default 512 tokens) repeated for B branches (default 8), and
`HFPolicy.generate` runs it twice per repeat: with `reuse_prefix=True` (the prefix is prefilled once
and its KV-cache row copied to every branch) and with `reuse_prefix=False` (every branch prefills
the prefix itself). Two workloads are timed:

* prefill only: `max_new_tokens=1` (one forward over the prompt batch, then one sampled token);
* decode: `max_new_tokens=32` (default), seeded sampling at T = 1.

EOS is switched off on the policy for the timed calls, so every branch decodes exactly the same
number of tokens in both modes (a random model would otherwise stop at random places). The two
modes are interleaved, after one untimed warm-up each, and the median and minimum over the repeats
are reported. Memory: before each mode's warm-up call, freed heap memory is returned to the OS
(malloc_trim) and the RSS high-water mark is reset (Linux clear_refs); the RSS before the call and
its peak during the call are reported, so peak - before is the call's own transient memory.

Correctness check inside the run: greedy outputs (with EOS on, as in training) must be
token-identical with and without reuse; the largest log-probability difference is reported too.

    .venv/bin/python bench/kv_reuse.py                      # defaults, writes bench/results/kv_reuse.json
    .venv/bin/python bench/kv_reuse.py --prefix 256 --branches 4 --repeats 3 --json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from tracerl.backends.hf import HFPolicy, SamplingParams
from tracerl.envs import make_env
from tracerl.models.tiny import build_tiny_model, train_tokenizer
from tracerl.sft import _corpus


from _results import save_result  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Give freed heap memory back to the OS, then reset the process's resident-set high-water mark
    (Linux >= 4.0), so the next peak belongs to the next call; False if the mark cannot be reset."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mib() -> float:
    hwm = _status_kib("VmHWM")
    if hwm is None:  # no procfs: the whole-process peak (KiB on Linux, bytes on macOS)
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hwm = ru // 1024 if sys.platform == "darwin" else ru
    return hwm / 1024


def build_policy(args) -> tuple[HFPolicy, int]:
    env = make_env("multihop", seed=0)  # the default world: enough text for a ~4k-token BPE vocabulary
    rng = random.Random(0)
    tasks = env.tasks("train")
    demos = [(t, env.oracle_turns(t, rng, {})) for t in tasks[: args.corpus_tasks]]
    tok = train_tokenizer(_corpus(env, demos), vocab_size=args.vocab)
    context = args.prefix + args.new_tokens + 64
    model = build_tiny_model(tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                             num_kv_heads=args.kv_heads, intermediate_size=args.intermediate,
                             max_position_embeddings=context, seed=args.seed).eval()
    policy = HFPolicy(model, tok, "cpu", max_context=context)
    return policy, sum(p.numel() for p in model.parameters())


def random_prefix(policy: HFPolicy, n: int, seed: int) -> list[int]:
    banned = set(policy.tokenizer.all_special_ids) | policy.eos_ids
    vocab = [i for i in range(len(policy.tokenizer)) if i not in banned]
    rng = random.Random(seed)
    return [rng.choice(vocab) for _ in range(n)]


def timed_call(policy: HFPolicy, prompts, params: SamplingParams, reuse: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)  # the same draws in both modes
    t0 = time.perf_counter()
    gens, stats = policy.generate(prompts, params, generator=gen, reuse_prefix=reuse)
    return time.perf_counter() - t0, gens, stats


def bench_workload(policy: HFPolicy, prompts, params: SamplingParams, repeats: int, seed: int) -> dict:
    times = {True: [], False: []}
    peaks, info = {}, {}
    for reuse in (True, False):  # warm-up (allocator, kernels), and the per-mode peak RSS
        can_reset = reset_peak_rss()
        before = rss_mib()
        _, gens, stats = timed_call(policy, prompts, params, reuse, seed)
        peaks[reuse] = (before, peak_rss_mib()) if can_reset else (before, None)
        info[reuse] = {"prefill_computed": stats.computed, "prefill_saved": stats.saved,
                       "gen_tokens": sum(len(g.token_ids) for g in gens)}
    for _ in range(repeats):
        for reuse in (True, False):
            dt, _, _ = timed_call(policy, prompts, params, reuse, seed)
            times[reuse].append(dt)
    out = {}
    for reuse, name in ((True, "reuse"), (False, "recompute")):
        ts = times[reuse]
        out[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "times_s": ts,
                     "rss_before_mib": peaks[reuse][0],
                     "peak_rss_mib": peaks[reuse][1], **info[reuse]}
    out["speedup_median"] = out["recompute"]["median_s"] / out["reuse"]["median_s"]
    out["speedup_min"] = out["recompute"]["min_s"] / out["reuse"]["min_s"]
    return out


def greedy_check(policy: HFPolicy, prompts, new_tokens: int) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    a, _ = policy.generate(prompts, params, reuse_prefix=True)
    b, _ = policy.generate(prompts, params, reuse_prefix=False)
    same = all(x.token_ids == y.token_ids for x, y in zip(a, b))
    diff = max((abs(p - q) for x, y in zip(a, b) for p, q in zip(x.logprobs, y.logprobs)), default=0.0)
    return {"token_identical": same, "max_abs_logprob_diff": diff, "tokens_per_branch": [len(g.token_ids) for g in a]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default 3.5 x hidden: 1792, ~29M parameters)")
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size requested (tags included)")
    ap.add_argument("--corpus-tasks", type=int, default=3000, help="train tasks whose oracle demos train the tokenizer")
    ap.add_argument("--prefix", type=int, default=512, help="shared prefix length in tokens")
    ap.add_argument("--branches", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens sampled per branch in the decode workload")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "kv_reuse.json"))
    args = ap.parse_args()
    args.intermediate = args.intermediate or int(3.5 * args.hidden)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.time()
    policy, n_params = build_policy(args)
    prefix = random_prefix(policy, args.prefix, args.seed)
    prompts = [prefix] * args.branches
    if not args.json:
        print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
              f"vocab {len(policy.tokenizer)}: {n_params:,} parameters; prefix {args.prefix} x {args.branches} branches",
              flush=True)

    check = greedy_check(policy, prompts, args.new_tokens)
    eos = policy.eos_ids
    policy.eos_ids = set()  # timed calls: every branch decodes exactly the requested number of tokens
    prefill = bench_workload(policy, prompts, SamplingParams(max_new_tokens=1), args.repeats, args.seed)
    decode = bench_workload(policy, prompts, SamplingParams(max_new_tokens=args.new_tokens), args.repeats, args.seed)
    policy.eos_ids = eos

    result = {
        "model": {"hidden_size": args.hidden, "num_layers": args.layers, "num_heads": args.heads,
                  "num_kv_heads": args.kv_heads, "intermediate_size": policy.model.config.intermediate_size,
                  "vocab_size": len(policy.tokenizer), "parameters": n_params},
        "prefix_tokens": args.prefix, "branches": args.branches, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "threads": torch.get_num_threads(), "seed": args.seed,
        "greedy_check": check,
        "prefill_only": prefill,
        "decode": decode,
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "wall_s": round(time.time() - t0, 1),
    }
    save_result(result, args.out, args.json)
    if args.json:
        return
    print(f"greedy outputs token-identical with/without reuse: {check['token_identical']} "
          f"(max |logprob diff| {check['max_abs_logprob_diff']:.2e})")
    print("| workload | mode | prefill tokens computed / saved | median s | min s | RSS before call MiB | peak RSS in call MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, w in (("prefill only (1 new token)", prefill), (f"{args.new_tokens} new tokens", decode)):
        for mode in ("reuse", "recompute"):
            r = w[mode]
            rss = [f"{x:.0f}" if x is not None else "n/a" for x in (r["rss_before_mib"], r["peak_rss_mib"])]
            print(f"| {name} | {mode} | {r['prefill_computed']} / {r['prefill_saved']} | "
                  f"{r['median_s']:.3f} | {r['min_s']:.3f} | {rss[0]} | {rss[1]} |")
        print(f"| {name} | **speed-up** | | **{w['speedup_median']:.2f}x** | {w['speedup_min']:.2f}x | | |")
    print(f"results: {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
