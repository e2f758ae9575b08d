"""Golden numbers of the training step: 5 seeded steps of each preset, recorded before a refactor.

    PYTHONPATH=src .venv/bin/python tests/golden/update_golden.py --write   # (re)record
    pytest tests/test_golden_update.py                                      # compare

Every preset starts from a warm start that solves some questions (so the policy-gradient term is
live) and carries a small entropy bonus, so every step has a non-zero gradient. Recorded per step:
the loss, the gradient norm, the mean reward, checksums of the leaves' advantages; per preset, a
checksum of the final parameters.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # conftest's TINY_RUN

from conftest import TINY_RUN  # noqa: E402

GOLDEN = HERE / "update_golden.json"
STEPS = 5

# A warm start that answers some questions (2-layer, hidden 96, 400 SFT steps: ~1.5 min once, cached).
BASE = [*TINY_RUN, "sft.steps=400", "sft.demos=400", "model.hidden_size=96", "rollout.prompts_per_step=4",
        "rollout.group_size=4", "trainer.micro_batch_size=6", "trainer.steps=5", "trainer.warmup_steps=0",
        "trainer.lr=3e-4", "trainer.eval_at_start=false", "trainer.tree_log_every=0",
        "algo.entropy_coef=0.002"]
TREE = ["rollout.allocator=tree_grpo", "algo.advantage=tree_grpo", "rollout.trees_per_prompt=2",
        "rollout.expansions=2", "rollout.rounds=1"]
PRESETS: dict[str, list[str]] = {
    "chains": ["algo.kl_coef=0.01"],
    "chains_head_at_positions": ["algo.entropy_coef=0.0", "rollout.group_size=8"],
    "chains_ppo2": ["trainer.ppo_epochs=2", "trainer.mini_batches=2"],
    "tree_grpo": TREE,
    "tree_grpo_packed": [*TREE, "algo.dedup_prefix=true"],
    "tree_grpo_packed_ppo2": [*TREE, "algo.dedup_prefix=true", "trainer.ppo_epochs=2", "algo.kl_coef=0.01"],
    # the same run, one row per leaf (recorded on the old code: the per-leaf reference at ratio != 1)
    "tree_grpo_ppo2": [*TREE, "trainer.ppo_epochs=2", "algo.kl_coef=0.01"],
    "trace": ["rollout.allocator=trace", "algo.advantage=tree_grpo", "alloc.pool_factor=2.0", "predictor.warmup=1",
              "predictor.hidden=32"],
    "flowtracer": ["credit.name=flowtracer"],
    "flowtracer_packed": [*TREE, "algo.dedup_prefix=true", "credit.name=flowtracer"],
    "distill_routed_rule": ["distill.mode=routed", "distill.annotator=rule", "distill.warmup_steps=1",
                            "distill.anneal_steps=20"],
    # Dr.GRPO's normaliser changes by design (longest response instead of the padded sequence length)
    "dr_grpo": ["algo.advantage=dr_grpo", "algo.aggregation=seq-mean-token-sum-norm"],
}
# Expected to change, each for a stated reason (tests/test_golden_update.py checks what they must match):
#   dr_grpo: its normaliser is now the longest response, not the padded sequence length;
#   tree_grpo_packed_ppo2: the old packed update summed the leaves' advantages before clipping, exact
#   only at ratio 1; the new one clips each leaf's term, so it must match the per-leaf run instead.
# Re-recorded for a stated reason: trace (2026-12-03, issue 18) — Stage 2 spends m_i·N·f chain-lengths of
# measured tokens (a root restart costs a chain) and Stage 1 is sized from the running measured f, so
# the samples differ from step 1 on; the estimator and loss code it exercises did not change.
# Re-recorded again (issue 18 item 2): the success predictor's default inputs gained the task features
# (predictor.task_features=true, chosen by `tracerl predictor-eval`, BENCHMARKS §15), so from the first warm
# step its values, and with them TRACE's allocation and samples, differ; no estimator or loss code changed.
EXPECTED_TO_CHANGE = {"dr_grpo": None, "tree_grpo_packed_ppo2": "tree_grpo_ppo2"}


def run_preset(name: str, run_dir: Path) -> dict:
    import torch

    from tracerl.config import load_config
    from tracerl.train import Trainer

    cfg = load_config(None, [*BASE, *PRESETS[name], f"run.dir={run_dir}"])
    tr = Trainer(cfg, overwrite=True, log=lambda *_: None)
    tr.setup()
    seen: list = []
    rollout = tr.rollout

    def keep(step):
        trees, cost = rollout(step)
        seen.append(trees)
        return trees, cost

    tr.rollout = keep
    steps = []
    for step in range(STEPS):
        seen.clear()
        m = tr.train_step(step)
        adv = [n.advantage or 0.0 for t in seen[0] for n in sorted(t.nodes.values(), key=lambda n: n.id) if n.done]
        steps.append({"loss": m.get("loss", 0.0), "grad_norm": m.get("grad_norm", 0.0), "reward": m["reward_mean"],
                      "gen_tokens": m["gen_tokens"], "leaves": len(adv), "adv_sum": math.fsum(adv),
                      "adv_abs": math.fsum(abs(a) for a in adv), "adv_sq": math.fsum(a * a for a in adv),
                      "adv_pos": math.fsum((i + 1) * a for i, a in enumerate(adv))})
    params = torch.cat([p.detach().flatten().double() for p in tr.model.parameters()])
    return {"steps": steps, "param_sum": float(params.sum()), "param_abs": float(params.abs().sum())}


def main() -> None:
    import tempfile

    import tracerl

    names = [a for a in sys.argv[1:] if not a.startswith("--")] or list(PRESETS)
    out = {"tracerl": str(Path(tracerl.__file__).parent), "presets": {}}
    if "--write" in sys.argv and GOLDEN.exists() and names != list(PRESETS):  # add or redo some presets only
        out = json.loads(GOLDEN.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out["presets"][name] = run_preset(name, Path(tmp) / name)
            print(name, json.dumps(out["presets"][name]["steps"][-1]), flush=True)
    if "--write" in sys.argv:
        GOLDEN.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
    else:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
