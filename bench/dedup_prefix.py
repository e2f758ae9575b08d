"""Benchmark: training on packed trees (`algo.dedup_prefix=true`) vs one row per leaf.

Takes the rollout trees a real run logged (RUN_DIR/trees/step_*.jsonl) and, for each logged step,
counts the tokens each layout runs through the model and times one forward + backward of the
policy-gradient loss over all leaves (same trees, same advantages) with the quickstart SFT policy.

    .venv/bin/python bench/dedup_prefix.py runs/compare/tree-seed0 [--repeats 3] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _results import save_result  # noqa: E402

from tracerl.algos.losses import token_logprobs  # noqa: E402
from tracerl.config import load_config  # noqa: E402
from tracerl.models.io import load_policy  # noqa: E402
from tracerl.packing import batch_packed, pack_tree  # noqa: E402
from tracerl.rollout import leaf_trajectories  # noqa: E402
from tracerl.train import pad_batch, resolve_model_path  # noqa: E402
from tracerl.tree import read_jsonl  # noqa: E402


def per_leaf(model, trajs, adv, pad_id, micro):
    ids, attn, mask, _ = pad_batch(trajs, pad_id)
    denom = mask[:, 1:].sum()
    for rows in torch.arange(len(trajs)).split(micro):
        n = int(attn[rows].sum(-1).max())
        logp = token_logprobs(model(input_ids=ids[rows, :n]).logits[:, :-1].float(), ids[rows, 1:n])
        m = mask[rows, 1:n]
        (-(logp * adv[rows, None] * m).sum() / denom).backward()
    return int(attn.sum())


def packed(model, packs, pad_id, micro_leaves):
    denom = sum(p.leaf_tokens for p in packs)
    tokens, chunk, leaves = 0, [], 0
    chunks = []
    for p in packs:
        n = p.n_leaves
        if chunk and leaves + n > micro_leaves:
            chunks.append(chunk)
            chunk, leaves = [], 0
        chunk.append(p)
        leaves += n
    chunks.append(chunk)
    for sub in chunks:
        ids, pos, mask = batch_packed(sub, pad_id)
        logits = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits.float()
        loss = 0.0
        for i, p in enumerate(sub):
            logp = torch.log_softmax(logits[i, p.src], -1).gather(-1, p.tgt[:, None]).squeeze(-1)
            loss = loss - (logp * p.coef).sum() / denom
        loss.backward()
        tokens += sum(len(p.input_ids) for p in sub)
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--micro", type=int, default=32, help="rows (leaves) per micro-batch, as trainer.micro_batch_size")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "dedup_prefix.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(Path(args.run_dir) / "config.yaml")
    model, tok = load_policy(resolve_model_path(cfg, log=lambda *_: None))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = []
    for f in sorted((Path(args.run_dir) / "trees").glob("step_*.jsonl")):
        trees = read_jsonl(f)
        for t in trees:
            t.update_stats()
        trajs = leaf_trajectories(trees)
        adv = torch.tensor([t.tree.nodes[t.node].advantage or 0.0 for t in trajs])
        leaf_adv: dict[int, dict[int, float]] = {}
        for t, a in zip(trajs, adv.tolist()):
            leaf_adv.setdefault(id(t.tree), {})[t.node] = a
        packs = [pack_tree(t, leaf_adv[id(t)]) for t in trees]
        times = {"per_leaf": [], "packed": []}
        for _ in range(args.repeats):
            for name in ("per_leaf", "packed"):
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                n = per_leaf(model, trajs, adv, pad_id, args.micro) if name == "per_leaf" else packed(model, packs, pad_id, args.micro)
                times[name].append(time.perf_counter() - t0)
                if name == "per_leaf":
                    leaf_tokens = n
                else:
                    packed_tokens = n
        rows.append({"file": f.name, "leaves": len(trajs), "trees": len(trees), "per_leaf_tokens": leaf_tokens,
                     "packed_tokens": packed_tokens, "token_ratio": leaf_tokens / packed_tokens,
                     "per_leaf_s": statistics.median(times["per_leaf"]), "packed_s": statistics.median(times["packed"]),
                     "speedup": statistics.median(times["per_leaf"]) / statistics.median(times["packed"])})
        print(json.dumps(rows[-1]))
    summary = {"run_dir": args.run_dir, "threads": args.threads, "repeats": args.repeats, "steps": rows,
               "mean_token_ratio": statistics.mean(r["token_ratio"] for r in rows),
               "mean_speedup": statistics.mean(r["speedup"] for r in rows)}
    save_result(summary, args.out, args.json)


if __name__ == "__main__":
    main()
