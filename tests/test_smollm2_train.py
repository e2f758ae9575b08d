"""SmolLM2-135M-Instruct as a policy: it runs the environment loop and a real trainer update."""

import pytest
import torch

from conftest import SMALL_WORLD
from tracerl.config import load_config
from tracerl.packing import build_batch
from tracerl.train import Trainer
from tracerl.tree import tree_leaves


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
    trajs = tree_leaves(trees)
    assert len(trees) == 1 and len(trajs) == 2 and cost.gen_tokens > 0
    assert all(trees[0].nodes[t.node].done for t in trajs)
    for t in trajs:
        assert 1 <= t.num_turns <= 2 and t.reward in (0.0, 1.0)
        assert "<|im_start|>assistant" in tr.tokenizer.decode(t.token_ids[: t.prompt_len])
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    # a real update with opposite advantages (the sampled rewards may well be equal for a 135M model)
    batch = build_batch([(trees[0], {trajs[0].node: 1.0, trajs[1].node: -1.0})], tr.layout())
    stats = tr.update(batch, step=0)
    assert torch.isfinite(torch.tensor(stats["loss"])) and stats["grad_norm"] > 0
    # the trainer recomputes exactly the log-probs the sampler reported: no re-tokenisation drift
    assert stats["logp_drift"] < 1e-3
    changed = sum(not torch.equal(before[n], p) for n, p in tr.model.named_parameters())
    assert changed > 0
    ev = tr.evaluate(0)  # greedy evaluation runs the same loop
    assert ev["n"] == 2 and 0.0 <= ev["em"] <= 1.0 and ev["mean_turns"] >= 1


@pytest.mark.slow
def test_smollm2_trains_with_the_trace_allocator(tmp_path):
    """TRACE on the 135M model: step 1 allocates uniformly (cold start), step 2 scores the prompt pool
    and the chains' prefixes with the predictor trained on step 1's tree (576-d hidden-state features)."""
    cfg = load_config(None, [
        "model.preset=smollm2-135m", f"run.dir={tmp_path / 'run'}", "env.max_turns=2",
        *(f"env.options.{k}={v}" for k, v in SMALL_WORLD.items()), "env.options.hop_mix={1: 1.0}",
        "rollout.allocator=trace", "algo.advantage=tree_grpo", "predictor.warmup=1", "predictor.hidden=16",
        "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_turn_tokens=16",
        "trainer.eval_size=2", "trainer.micro_batch_size=4", "trainer.lr=1e-5", "trainer.warmup_steps=0",
        "trainer.tensorboard=false", "alloc.epsilon=0.0", "algo.entropy_coef=0.01", "algo.skip_uniform_groups=false",
    ])
    tr = Trainer(cfg, log=lambda *_: None)
    tr.setup()
    assert tr.predictor is not None and tr.predictor.dim > tr.model.config.hidden_size == 576
    rows = [tr.train_step(s) for s in range(2)]
    assert [r["predictor_warm"] for r in rows] == [0, 1]
    for r in rows:
        assert r["pool_size"] == 4 and r["continuations"] > 0 and r["root_rollouts"] >= 2
        assert r["gen_tokens"] > 0 and torch.isfinite(torch.tensor(r.get("loss", 0.0))) and r["grad_norm"] > 0
    assert "predictor_loss" in rows[-1] and 0.0 <= rows[-1]["predictor_brier"] <= 1.0
