"""Packed trees (each shared node once, tree attention mask) score and train like per-leaf rows."""

from __future__ import annotations

import random

import pytest
import torch

from tracerl.algos.losses import ppo_clip, token_logprobs
from tracerl.allocate import ALLOCATORS, AllocationContext
from tracerl.backends.hf import SamplingParams
from tracerl.config import RolloutConfig
from tracerl.packing import batch_packed, pack_tree
from tracerl.rollout import RolloutEngine, leaf_trajectories
from tracerl.train import pad_batch


def _trees(policy, env):
    eng = RolloutEngine(policy, env, SamplingParams(max_new_tokens=12), torch.Generator().manual_seed(5))
    cfg = RolloutConfig(allocator="tree_grpo", trees_per_prompt=2, expansions=2, rounds=2)
    trees = ALLOCATORS.get("tree_grpo")(AllocationContext(eng, cfg, random.Random(1)), env.tasks("train")[:2])
    for t in trees:
        t.update_stats()
    return trees


def _per_leaf_loss(model, trajs, adv):
    ids, _, mask, _ = pad_batch(trajs, 0)
    logp = token_logprobs(model(input_ids=ids).logits[:, :-1].float(), ids[:, 1:])
    m = mask[:, 1:]
    pg, _ = ppo_clip(logp, logp.detach(), adv[:, None] * m, m)
    return (pg * m).sum() / m.sum(), logp, m


def _packed_loss(model, packs, pad_id):
    ids, pos, mask = batch_packed(packs, pad_id)
    logits = model(input_ids=ids, position_ids=pos, attention_mask=mask).logits.float()
    total, denom, logps = 0.0, sum(p.leaf_tokens for p in packs), []
    for i, p in enumerate(packs):
        logp = torch.log_softmax(logits[i, p.src], -1).gather(-1, p.tgt[:, None]).squeeze(-1)
        pg, _ = ppo_clip(logp[None], logp.detach()[None], p.coef[None], torch.ones(1, len(logp)))
        total = total + pg.sum()
        logps.append(logp)
    return total / denom, logps


def test_packed_tree_gives_per_leaf_logprobs_and_the_same_gradient(tiny_policy, small_env):
    model = tiny_policy.model
    trees = _trees(tiny_policy, small_env)
    trajs = leaf_trajectories(trees)
    gen = torch.Generator().manual_seed(0)
    adv = torch.randn(len(trajs), generator=gen)
    leaf_adv: dict[int, dict[int, float]] = {}
    for t, a in zip(trajs, adv.tolist()):
        leaf_adv.setdefault(id(t.tree), {})[t.node] = a
    packs = [pack_tree(tree, leaf_adv[id(tree)]) for tree in trees]

    model.zero_grad()
    loss_leaf, logp_leaf, m = _per_leaf_loss(model, trajs, adv)
    loss_leaf.backward()
    g_leaf = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_packed, logp_packed = _packed_loss(model, packs, tiny_policy.pad_id)
    loss_packed.backward()
    g_packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    torch.testing.assert_close(loss_packed, loss_leaf, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_leaf, g_packed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # every leaf's sampled-token log-probs are the packed ones of its path (the same conditioning)
    for traj, row, mrow in zip(trajs, logp_leaf, m):
        k = trees.index(traj.tree)
        packed = logp_packed[k][packs[k].leaf_index(traj.tree, traj.node)]
        torch.testing.assert_close(packed.detach(), row[mrow.bool()].detach(), atol=1e-4, rtol=0)
        sampled = packs[k].sample_logp[packs[k].leaf_index(traj.tree, traj.node)]
        assert sampled.tolist() == [lp for lp, mm in zip(traj.logprobs, traj.loss_mask) if mm]
    # and the packing runs fewer tokens through the model than one row per leaf
    assert sum(len(p.input_ids) for p in packs) < sum(p.leaf_sequence_tokens for p in packs)
    assert sum(p.leaf_tokens for p in packs) == int(m.sum())


def test_packed_positions_and_mask_follow_the_paths(tiny_policy, small_env):
    tree = _trees(tiny_policy, small_env)[0]
    leaves = tree.leaf_ids()
    p = pack_tree(tree, {leaf: 1.0 for leaf in leaves})
    assert len(p.input_ids) == sum(len(n.gen_ids) + len(n.obs_ids) for n in tree.nodes.values())
    assert p.allowed.diagonal().all() and not p.allowed.triu(1).any()
    assert (p.count >= 1).all() and p.coef.tolist() == p.count.tolist()  # all advantages 1: coef = leaves below
    for leaf in leaves:  # along any leaf's path the positions are 0..len-1
        ids, _, _ = tree.prefix(leaf)
        assert max(p.position_ids.tolist()) >= len(ids) - 1 or len(leaves) > 1


def test_trainer_packed_update_equals_the_per_leaf_update(tmp_path):
    """One optimizer step from the same trees: per-leaf rows and packed trees give the same weights."""
    import copy

    from conftest import TINY_RUN
    from tracerl.config import load_config
    from tracerl.train import Trainer

    cfg = load_config(None, [*TINY_RUN, f"run.dir={tmp_path / 'r'}", "rollout.allocator=tree_grpo",
                             "algo.advantage=tree_grpo", "rollout.rounds=2", "trainer.warmup_steps=0",
                             "trainer.micro_batch_size=3"])
    tr = Trainer(cfg, log=lambda *_: None)
    tr.setup()
    trees, _ = tr.rollout(0)
    trajs = leaf_trajectories(trees)
    adv = torch.randn(len(trajs), generator=torch.Generator().manual_seed(1))
    start = copy.deepcopy(tr.model.state_dict())
    # plain SGD: the step is lr × the (clipped) gradient, so comparing steps compares gradients; Adam's
    # first step, lr·g/|g|, would blow float noise in near-zero gradient entries up to lr
    tr.cfg.trainer.lr = 1.0  # steps far above the parameters' float spacing
    tr.optimizer = torch.optim.SGD(tr.model.parameters(), lr=1.0)
    per_leaf = tr.update(trajs, adv, 0)
    step_leaf = {k: v - start[k] for k, v in tr.model.state_dict().items()}
    tr.model.load_state_dict(start)
    tr.optimizer = torch.optim.SGD(tr.model.parameters(), lr=1.0)
    packed = tr.update_packed(trajs, adv, 0)
    scale = max(float(v.abs().max()) for v in step_leaf.values())
    assert scale > 0
    for k, v in tr.model.state_dict().items():
        torch.testing.assert_close(v - start[k], step_leaf[k], atol=1e-4 * scale, rtol=1e-3)
    assert packed["loss"] == pytest.approx(per_leaf["loss"], abs=1e-5)
    assert packed["train_tokens"] < packed["train_tokens_per_leaf"]
