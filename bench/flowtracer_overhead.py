"""Benchmark: FlowTracer's cost (attention pass + flow + weights) against the policy update it feeds.

For each model size, B trajectories of about N tokens (default 8 × ~1024) are built from the default
multi-hop world through the normal token path (`replay_turns`: a real prompt, useless searches with
their real observations until the length is reached, then the oracle's search and answer turns),
and given random non-zero advantages. Timed, after one untimed warm-up, `--repeats` times each
(median reported; the phases run interleaved), every call starting from the same weights:

* update: what `Trainer.update` does with those rows (ppo_epochs 1, rows layout: the trajectories as
  chains through `build_batch`): forward + backward of the training objective (PPO-clip, token-mean)
  in micro-batches of `--micro`, gradient clipping, one AdamW step;
* update + tapped credit: the same with `credit.name=flowtracer` as the trainer runs it: regions,
  attention probabilities of the default middle layers recomputed from the update's own forward
  (`CreditStep.hook`), flow solves, top-40% weights multiplying the advantages. "credit inside update" is the
  time the credit code itself measured (hooks + flows + regions + weights);
  share (tapped) = credit inside update / (update + tapped credit);
* separate pass: `TokenCredit.__call__`, a no-grad forward stopped after the last chosen layer (the
  alternative to tapping the update); share (separate) = pass / (pass + update).
  Its attention pass is also timed alone.

All times are CPU seconds of this process (`time.process_time`; the credit code's own `credit_s` too):
on a machine whose cores are shared with other jobs, wall time would also count waiting for a core.
Wall times are recorded in the JSON as well. The rollout (generation), which dominates a real step, is
left out, so the share of a whole training step is smaller than these. Memory: before each timed phase freed heap is returned to the OS and the
RSS high-water mark reset (Linux clear_refs); the peak minus the RSS before is that phase's own
transient memory.

Models (randomly initialised Qwen3, 2k BPE vocabulary trained on the world's text):
    tiny   hidden 128, 4 layers, 4 heads / 2 KV, MLP 384   (the quickstart shape, ~0.8M parameters)
    30m    hidden 512, 8 layers, 8 heads / 4 KV, MLP 1792  (~29M parameters, as bench/kv_reuse.py)

    .venv/bin/python bench/flowtracer_overhead.py --threads 1          # writes bench/results/flowtracer_overhead.json
    .venv/bin/python bench/flowtracer_overhead.py --models tiny --tokens 512 --rows 4 --repeats 2 --json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _results import save_result  # noqa: E402
from kv_reuse import peak_rss_mib, reset_peak_rss, rss_mib  # noqa: E402

from tracerl.config import CreditConfig  # noqa: E402
from tracerl.credit import TokenCredit  # noqa: E402
from tracerl.credit import attention as credit_attention  # noqa: E402
from tracerl.credit import tracer as credit_tracer  # noqa: E402
from tracerl.credit.attention import attention_maps  # noqa: E402
from tracerl.envs import make_env  # noqa: E402
from tracerl.models.tiny import build_tiny_model, train_tokenizer  # noqa: E402
from tracerl.objective import Denominators, LossSpec, objective  # noqa: E402
from tracerl.packing import TokenBatch, build_batch  # noqa: E402
from tracerl.rollout import replay_turns, turn_records  # noqa: E402
from tracerl.sft import _corpus  # noqa: E402
from tracerl.tree import RolloutTree  # noqa: E402

MODELS = {
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384),
    "30m": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1792),
}


def build_trajectories(env, tok, rows: int, tokens: int, seed: int):
    """`rows` trajectories of at least `tokens` tokens: useless searches, then the oracle's turns."""
    rng = random.Random(seed)
    out = []
    for task in env.tasks("train")[:rows]:
        oracle = env.oracle_turns(task, rng, {})
        searches: list[str] = []
        while True:
            name = env.world.other_entity_name(rng, task.meta["chain"])
            searches.append(f"<think>Maybe {name} helps.</think>\n<search>{name}</search>")
            traj = replay_turns(tok, env, task, searches + oracle)
            if len(traj.token_ids) >= tokens or len(searches) + len(oracle) >= env.max_turns:
                break
        out.append(traj)
    return out


def chain_batch(trajs, adv: torch.Tensor) -> TokenBatch:
    """The trajectories as chains (one tree each, its leaf hanging from the root) in the rows layout
    (one row per leaf, as the trainer's default `algo.dedup_prefix=false`)."""
    with_adv = []
    for g, (traj, a) in enumerate(zip(trajs, adv.tolist())):
        tree = RolloutTree(traj.task, g, 0, traj.token_ids[: traj.prompt_len], {})
        leaf = tree.attach(0, turn_records(traj, 0), done=True, reward=traj.reward, info=traj.info)
        with_adv.append((tree, {leaf: a}))
    return build_batch(with_adv, "rows")


def update_step(model, optimizer, batch: TokenBatch, spec: LossSpec, pad_id: int, micro: int, credit=None) -> None:
    """Trainer.update with ppo_epochs = mini_batches = 1: the training objective (token-mean PPO-clip)
    in micro-batches of `micro` leaves, clip, AdamW step; with `credit` (a CreditStep) each forward is
    tapped (`CreditStep.hook`) and the weights multiply the advantages."""
    batch = dataclasses.replace(batch, coef=batch.coef.clone(), weights=None)  # the hook writes A·w here
    hook = credit.hook(batch, model) if credit is not None else None
    packs = list(range(len(batch.packs)))
    den = Denominators.of(spec, batch.mask, batch.mask, batch.max_response)
    optimizer.zero_grad(set_to_none=True)
    model.train()
    for group in batch.micro_batches(packs, micro):
        loss, _ = objective(model, batch.micro(group, pad_id), spec, den, hook=hook)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    model.eval()


def measure(phases: dict, repeats: int) -> dict:
    """Wall and CPU seconds of each phase (name -> callable): one warm-up call per phase, which also
    gives its peak memory, then `repeats` rounds that run the phases interleaved (so a change in the
    machine's load hits all of them alike). CPU time (`time.process_time`, all threads of this
    process) is what the tables use: on a machine whose cores are shared, wall time also counts the
    time spent waiting for a core."""
    out = {}
    for name, fn in phases.items():
        can_reset = reset_peak_rss()
        before = rss_mib()
        fn()
        peak = peak_rss_mib() if can_reset else None
        out[name] = {"cpu_s": [], "wall_s": [], "rss_before_mib": before, "peak_rss_mib": peak,
                     "transient_mib": (peak - before) if peak is not None and before is not None else None}
    for _ in range(repeats):
        for name, fn in phases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            out[name]["wall_s"].append(time.perf_counter() - t0)
            out[name]["cpu_s"].append(time.process_time() - c0)
    for r in out.values():
        r.update(median_s=statistics.median(r["cpu_s"]), min_s=min(r["cpu_s"]),
                 wall_median_s=statistics.median(r["wall_s"]))
    return out


def bench_model(name: str, tok, trajs, args) -> dict:
    model = build_tiny_model(tok, max_position_embeddings=max(len(t.token_ids) for t in trajs) + 8, seed=0,
                             **MODELS[name]).eval()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    adv = torch.tensor([(-1.0) ** i * (0.5 + 0.1 * i) for i in range(len(trajs))])
    credit = TokenCredit(CreditConfig(name="flowtracer", batch_size=args.credit_batch), model, tok)
    pad = tok.pad_token_id
    batch = chain_batch(trajs, adv)
    leaves = batch.leaves  # the trainer's view of the trajectories (token ids, loss mask, turns, ...)
    spec = LossSpec()  # token-mean PPO-clip at T = 1; the LM head at the scored positions (a Qwen3)
    longest = max(len(t.token_ids) for t in trajs)

    def attention_only():
        for b0 in range(0, len(trajs), args.credit_batch):
            chunk = trajs[b0:b0 + args.credit_batch]
            ids = torch.full((len(chunk), max(len(t.token_ids) for t in chunk)), pad)
            for j, t in enumerate(chunk):
                ids[j, :len(t.token_ids)] = torch.tensor(t.token_ids)
            attention_maps(model, ids, credit.layers)

    res = {"model": name, "params": params, "layers_traced": credit.layers, "rows": len(trajs),
           "tokens_mean": statistics.mean(len(t.token_ids) for t in trajs), "tokens_max": longest,
           "sampled_tokens_mean": statistics.mean(sum(t.loss_mask) for t in trajs),
           "credit_batch": args.credit_batch, "micro_batch": args.micro,
           "attention_buffer_mib": args.credit_batch * longest ** 2 * 4 / 2**20}
    state = copy.deepcopy(model.state_dict())
    inside = []

    def tapped_update():
        cs = credit.start(leaves, batch.adv, step=0)
        update_step(model, optimizer, batch, spec, pad, args.micro, cs)
        inside.append(cs.result().metrics["credit_s"])

    def restore(fn):  # every timed call starts from the same weights (the same flows, no drift)
        def call():
            model.load_state_dict(state)
            fn()
        return call

    res.update(measure({
        "update": restore(lambda: update_step(model, optimizer, batch, spec, pad, args.micro)),
        "update_with_credit": restore(tapped_update),
        "credit_separate_pass": restore(lambda: credit(leaves, batch.adv, step=0)),
        "attention_separate_pass": restore(attention_only),
    }, args.repeats))
    res["credit_inside_update_s"] = statistics.median(inside[1:])  # the timed calls, not the warm-up
    u, uc = res["update"]["median_s"], res["update_with_credit"]["median_s"]
    res["share_tapped"] = res["credit_inside_update_s"] / uc
    res["share_tapped_by_difference"] = (uc - u) / uc  # noisier: a difference of two timings
    c = res["credit_separate_pass"]["median_s"]
    res["share_separate_pass"] = c / (c + u)
    return res


class _CpuClock:
    """Stands in for the `time` module of the credit code, so the seconds it measures itself
    (`credit_s`) are CPU seconds too."""

    perf_counter = staticmethod(time.process_time)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "30m"], choices=sorted(MODELS))
    ap.add_argument("--rows", type=int, default=8, help="trajectories per step")
    ap.add_argument("--tokens", type=int, default=1024, help="minimum trajectory length")
    ap.add_argument("--micro", type=int, default=4, help="rows per update micro-batch")
    ap.add_argument("--credit-batch", type=int, default=4, help="credit.batch_size")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "flowtracer_overhead.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    credit_attention.time = credit_tracer.time = _CpuClock
    env = make_env("multihop", seed=0, max_turns=24, top_k=2)
    rng = random.Random(0)
    demos = [(t, env.oracle_turns(t, rng, {}), None) for t in env.tasks("train")[:300]]  # (task, turns, note)
    tok = train_tokenizer(_corpus(env, demos), vocab_size=2048)
    trajs = build_trajectories(env, tok, args.rows, args.tokens, args.seed)
    results = [bench_model(m, tok, trajs, args) for m in args.models]
    out = {"threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
           "args": vars(args), "results": results}
    save_result(out, args.out, args.json)
    print("| model | params | rows × tokens | update s | update + tapped credit s | credit inside update s |"
          " share (tapped) | share by difference | separate pass s | share (separate pass) |"
          " peak MiB: update / tapped / separate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mib = " / ".join(f"{r[k]['transient_mib']:.0f}" if r[k]["transient_mib"] is not None else "-"
                         for k in ("update", "update_with_credit", "credit_separate_pass"))
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['rows']} × {r['tokens_mean']:.0f} | "
              f"{r['update']['median_s']:.2f} | {r['update_with_credit']['median_s']:.2f} | "
              f"{r['credit_inside_update_s']:.2f} | {100 * r['share_tapped']:.1f}% | "
              f"{100 * r['share_tapped_by_difference']:.1f}% | {r['credit_separate_pass']['median_s']:.2f} | "
              f"{100 * r['share_separate_pass']:.1f}% | {mib} |")


if __name__ == "__main__":
    main()
