"""SmolLM2-135M-Instruct as a policy: it runs the environment loop and a real trainer update."""

import pytest
import torch

from conftest import SMALL_WORLD
from tracerl.config import load_config
from tracerl.rollout import leaf_trajectories
from tracerl.train import Trainer


@pytest.mark.slow
def test_smollm2_rollout_and_training_step(tmp_path):
    cfg = load_config(None, [
        "model.preset=smollm2-135m", f"run.dir={tmp_path / 'run'}", "env.max_turns=2",
        *(f"env.options.{k}={v}" for k, v in SMALL_WORLD.items()), "env.options.hop_mix={1: 1.0}",
        "rollout.prompts_per_step=1", "rollout.group_size=2", "rollout.max_turn_tokens=24",
        "trainer.eval_size=2", "trainer.micro_batch_size=2", "trainer.lr=1e-5", "trainer.warmup_steps=0",
        "trainer.tensorboard=false",
    ])
    tr = Trainer(cfg, log=lambda *_: None)
    tr.setup()
    assert tr.tokenizer.chat_template  # prompts go through SmolLM2's own chat template
    trees, cost = tr.rollout(0)
    trajs = leaf_trajectories(trees)
    assert len(trees) == 1 and len(trajs) == 2 and all(t.done for t in trajs) and cost.gen_tokens > 0
    for t in trajs:
        assert 1 <= t.num_turns <= 2 and t.reward in (0.0, 1.0)
        assert "<|im_start|>assistant" in tr.tokenizer.decode(t.token_ids[: t.prompt_len])
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    # a real update with opposite advantages (the sampled rewards may well be equal for a 135M model)
    stats = tr.update(trajs, torch.tensor([1.0, -1.0]), step=0)
    assert torch.isfinite(torch.tensor(stats["loss"])) and stats["grad_norm"] > 0
    # the trainer recomputes exactly the log-probs the sampler reported: no re-tokenisation drift
    assert stats["logp_drift"] < 1e-3
    changed = sum(not torch.equal(before[n], p) for n, p in tr.model.named_parameters())
    assert changed > 0
    ev = tr.evaluate(0)  # greedy evaluation runs the same loop
    assert ev["n"] == 2 and 0.0 <= ev["em"] <= 1.0 and ev["mean_turns"] >= 1
