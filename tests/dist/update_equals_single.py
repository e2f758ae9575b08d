"""Run under `torchrun --nproc-per-node 2`: one distributed update equals the single-process update.

Every rank rolls out the step's whole batch in one process (same seeds, same weights, so the same trees
everywhere), keeps the trees of its own prompts, and runs `Trainer.update` on them with the policy
sharded by FSDP2; a second, single-process trainer updates on the whole batch. The gradients, the loss,
the gradient norm and the weights after the step must agree. Prints one JSON line per case on rank 0
and exits non-zero on a mismatch.

    torchrun --nproc-per-node 2 tests/dist/update_equals_single.py OUT_DIR [override ...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from tracerl.config import load_config
from tracerl.distributed import Single, connect
from tracerl.packing import build_batch
from tracerl.setup import resolve_model_path
from tracerl.train import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import with_random_advantages  # noqa: E402

CASES = {
    # 3 prompts on 2 ranks: 8 and 4 leaves, so the ranks run different numbers of micro-batches
    "chains-rows-token-mean": ["rollout.allocator=uniform", "algo.aggregation=token-mean", "rollout.prompts_per_step=3"],
    "trees-packed-dr-grpo": ["rollout.allocator=tree_grpo", "algo.advantage=tree_grpo", "algo.dedup_prefix=true",
                             "algo.aggregation=seq-mean-token-sum-norm"],
    "chains-rows-seq-mean-kl-2-epochs": ["rollout.allocator=uniform", "algo.aggregation=seq-mean-token-mean",
                                         "algo.kl_coef=0.05", "trainer.ppo_epochs=2"],
    "chains-rows-plain": ["rollout.allocator=uniform"],  # the batch of the two cases below, without their term
    # token credit reads the attention of the (sharded) update forward
    "chains-rows-flowtracer": ["rollout.allocator=uniform", "credit.name=flowtracer"],
    # routed self-distillation: the teacher pass runs on each rank's unsharded generation copy
    "chains-rows-all-token-distill": ["rollout.allocator=uniform", "distill.mode=all_tokens", "distill.warmup_steps=0",
                                      "distill.hold_steps=5", "distill.teacher_context=answer"],
    # 1 prompt on 2 ranks: rank 1 has nothing to train on and only joins the collectives
    "one-prompt-idle-rank": ["rollout.allocator=uniform", "rollout.prompts_per_step=1"],
}
TOL = 1e-6


def grads(model, world) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[name] = torch.zeros_like(p if not hasattr(p, "full_tensor") else p.full_tensor()) if g is None else g.detach().clone()
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> float:
    keys = list(a) if keys is None else keys
    missing = [k for k in keys if k not in a or k not in b]
    assert not missing, missing
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


def main() -> int:
    out_dir, extra = Path(sys.argv[1]), sys.argv[2:]
    resolve_model_path(load_config(None, extra), log=lambda *a: None)  # the warm start, before the process group
    world = connect("cpu", 120)
    failed = False
    for name, overrides in CASES.items():
        common = [*extra, *overrides, "trainer.micro_batch_size=3", "trainer.tensorboard=false"]
        dist_cfg = load_config(None, [*common, f"run.dir={out_dir / name / 'dist'}"])
        ref_cfg = load_config(None, [*common, f"run.dir={out_dir / name / f'single-{world.rank}'}"])
        sharded = Trainer(dist_cfg, overwrite=True, log=lambda *a: None, world=world)
        sharded.setup()
        single = Trainer(ref_cfg, overwrite=True, log=lambda *a: None, world=Single())
        single.setup()

        trees, _ = single.rollout(0)  # the whole step's batch, the same on every rank
        # random advantages: a tiny untrained policy often gets one reward everywhere (all advantages 0)
        kept = with_random_advantages(trees, seed=7)
        mine = [(t, la) for t, la in kept if t.group % world.size == world.rank]  # this rank's prompts
        batch_1, batch_n = build_batch(kept, single.layout()), build_batch(mine, sharded.layout()) if mine else None
        credit_1 = single.credit.start(batch_1.leaves, batch_1.adv, 0)
        credit_n = sharded.credit.start(batch_n.leaves, batch_n.adv, 0) if batch_n is not None else None
        stats_1 = single.update(batch_1, 0, credit_1)
        stats_n = sharded.update(batch_n, 0, credit_n)
        if credit_1 is not None:  # the weights computed from each forward's attention agree too
            w1 = credit_1.result().weights
            wn = [w for part in world.gather(credit_n.result().weights if credit_n is not None else [])
                  for w in part]
            order = [i for r in range(world.size) for i, (t, la) in enumerate(kept) if t.group % world.size == r]
            flat_1 = [w for i in order for w in w1[sum(len(la) for _, la in kept[:i]):][:len(kept[i][1])]]
            assert len(flat_1) == len(wn) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(flat_1, wn))
            assert any(bool((w != 1).any()) for w in wn), "token credit changed no weight"
        loss_n = float(world.sum(stats_n["loss"]))
        g_diff = max_diff(grads(single.model, world), grads(sharded.model, world))
        names = [n for n, _ in single.model.named_parameters()]
        w_diff = max_diff(single.model.state_dict(), world.full_state(sharded.model), names)
        gen_diff = max_diff(single.model.state_dict(), sharded.gen_model.state_dict(), names)
        moved = max_diff(single.model.state_dict(), sharded.ref_model.state_dict(), names) \
            if sharded.ref_model is not None else float("nan")
        row = {"case": name, "rank_leaves": world.gather(sum(len(la) for _, la in mine)),
               "loss_1": stats_1["loss"], "loss_n": loss_n, "grad_norm_1": stats_1["grad_norm"],
               "grad_norm_n": stats_n["grad_norm"], "max_grad_diff": g_diff, "max_weight_diff": w_diff,
               "generation_copy_diff": gen_diff, "weights_moved_from_ref": moved,
               **{k: v for k, v in stats_1.items() if k.startswith("distill")}}
        ok = (g_diff <= TOL and w_diff <= TOL and gen_diff <= TOL and abs(loss_n - stats_1["loss"]) <= TOL
              and abs(stats_n["grad_norm"] - stats_1["grad_norm"]) <= TOL * max(1.0, stats_1["grad_norm"]))
        failed |= not ok
        if world.is_main:
            print(json.dumps({**row, "ok": ok}), flush=True)
    world.close()
    return 1 if failed else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # as tracerl.cli does under torchrun: no interpreter teardown of the process group
