"""Benchmark: training on packed trees (`algo.dedup_prefix=true`) vs one row per leaf.

Takes the rollout trees a real run logged (RUN_DIR/trees/step_*.jsonl) and, for each logged step,
counts the tokens each layout (`build_batch` rows / trees) runs through the model and times one forward +
backward of the training objective over all leaves (same trees, same advantages) with the run's policy.

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

from tracerl.config import load_config  # noqa: E402
from tracerl.credit.attention import SUPPORTED_MODEL_TYPES  # noqa: E402
from tracerl.models.io import load_policy  # noqa: E402
from tracerl.objective import Denominators, LossSpec, objective  # noqa: E402
from tracerl.packing import TokenBatch, build_batch  # noqa: E402
from tracerl.setup import resolve_model_path  # noqa: E402
from tracerl.tree import read_jsonl  # noqa: E402


def forward_backward(model, batch: TokenBatch, spec: LossSpec, pad_id: int, micro: int) -> int:
    """One forward + backward of the training objective over every leaf of the batch, `micro` leaves
    per micro-batch (as the trainer groups them); returns the tokens its packs run (padding excluded)."""
    packs = list(range(len(batch.packs)))
    den = Denominators.of(spec, batch.mask, batch.mask, batch.max_response)
    for group in batch.micro_batches(packs, micro):
        loss, _ = objective(model, batch.micro(group, pad_id), spec, den)
        loss.backward()
    return sum(len(p) for p in batch.packs)


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
    # the trainer's objective: the LM head at the scored positions where the model allows it
    spec = LossSpec.from_config(cfg, getattr(model.config, "model_type", None) in SUPPORTED_MODEL_TYPES
                                and model.get_output_embeddings() is not None)
    rows = []
    for f in sorted((Path(args.run_dir) / "trees").glob("step_*.jsonl")):
        trees = read_jsonl(f)
        for t in trees:
            t.update_stats()
        # the advantages each leaf was trained with (logged in the trees)
        with_adv = [(t, {leaf: t.nodes[leaf].advantage or 0.0 for leaf in t.leaf_ids()}) for t in trees]
        batches = {"per_leaf": build_batch(with_adv, "rows"), "packed": build_batch(with_adv, "trees")}
        times: dict[str, list[float]] = {"per_leaf": [], "packed": []}
        tokens: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, batch in batches.items():
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                tokens[name] = forward_backward(model, batch, spec, pad_id, args.micro)
                times[name].append(time.perf_counter() - t0)
        leaf_tokens, packed_tokens = tokens["per_leaf"], tokens["packed"]
        rows.append({"file": f.name, "leaves": len(batches["per_leaf"].leaves), "trees": len(trees),
                     "per_leaf_tokens": leaf_tokens,
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
