"""Shared fixtures: a small world, a tiny random policy and the overrides of a seconds-long run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRACERL_CACHE", str(REPO / ".cache" / "test-models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL_WORLD = {"n_entities": 100, "train_size": 120, "validation_size": 16, "test_size": 16, "heldout_size": 16}

# A run that exercises every part of the loop in seconds (tiny world, 2-layer model, a few SFT steps).
TINY_RUN = [
    *(f"env.options.{k}={v}" for k, v in SMALL_WORLD.items()),
    "sft.demos=120", "sft.steps=30", "sft.batch_size=8", "sft.lr=3e-3",
    "model.hidden_size=64", "model.num_layers=2", "model.vocab_size=600", "model.max_context=512",
    "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_turn_tokens=24",
    "trainer.steps=4", "trainer.eval_every=2", "trainer.checkpoint_every=2", "trainer.eval_size=8",
    "trainer.micro_batch_size=4", "trainer.progress=false", "trainer.warmup_steps=1",
    "algo.skip_uniform_groups=false",
]
# The same run with gradients that are never all zero (the tiny policy earns few rewards, so with TINY_RUN
# alone every advantage can be 0): an entropy bonus, sampling at T = 1 and a larger step. Trainer tests
# that check what training did (resume, faults) use this and assert the weights moved.
TINY_LEARNING = [*TINY_RUN, "algo.entropy_coef=0.01", "rollout.temperature=1.0", "trainer.lr=1e-3"]
# TRACE with the predictor warm from step 2 on: exercises the pool scoring pass, Stage 1 DP, Stage 2
# on predicted prefix values, and the predictor state (head, optimizer, moments, buffer) in checkpoints
TRACE_RUN = ["rollout.allocator=trace", "algo.advantage=tree_grpo", "predictor.warmup=1", "predictor.hidden=16",
             "alloc.epsilon=0.5", "trainer.tree_log_every=2"]


def with_random_advantages(trees, seed: int = 0):
    """[(tree, {leaf: A})] with a random advantage per leaf, drawn in `tree_leaves` order."""
    import torch

    from tracerl.tree import tree_leaves

    leaves = tree_leaves(trees)
    adv = torch.randn(len(leaves), generator=torch.Generator().manual_seed(seed)).tolist()
    out = [(t, {}) for t in trees]
    for lf, a in zip(leaves, adv):
        out[trees.index(lf.tree)][1][lf.node] = a
    return out


@pytest.fixture(scope="session")
def small_env():
    from tracerl.envs import make_env

    return make_env("multihop", seed=0, **SMALL_WORLD)


@pytest.fixture(scope="session")
def tiny_policy(small_env):
    """A randomly initialised 2-layer Qwen3 with a BPE tokenizer trained on the small world."""
    import random

    from tracerl.backends.hf import HFPolicy
    from tracerl.models.tiny import build_tiny_model, train_tokenizer
    from tracerl.sft import _corpus

    rng = random.Random(0)
    demos = [(t, small_env.oracle_turns(t, rng, {}), None) for t in small_env.tasks("train")[:60]]
    tok = train_tokenizer(_corpus(small_env, demos), vocab_size=600)
    model = build_tiny_model(tok, hidden_size=64, num_layers=2, seed=0).eval()
    return HFPolicy(model, tok, "cpu", max_context=512)


def assert_learned(run_dir) -> None:
    """What a trainer test checks before it trusts equalities between runs: every step had a non-zero
    gradient, and the last checkpoint's weights differ from the initial policy's."""
    import json

    import torch
    from safetensors.torch import load_file

    from tracerl.checkpoint import latest_checkpoint
    from tracerl.runlog import read_jsonl

    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rows and all(r["grad_norm"] > 0 for r in rows), [r.get("grad_norm") for r in rows]
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    start = Path(json.loads((ckpt / "trainer_state.json").read_text())["model_path"]) / "model.safetensors"
    before, after = load_file(str(start)), load_file(str(ckpt / "model" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the weights never moved"
