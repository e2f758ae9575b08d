"""The update's LM head at the trained positions only gives the same loss and gradient as full logits."""

import copy

import pytest
import torch

from conftest import TINY_RUN
from tracerl.config import load_config
from tracerl.rollout import leaf_trajectories
from tracerl.train import Trainer


def test_head_at_trained_positions_equals_full_logits(tmp_path):
    cfg = load_config(None, [*TINY_RUN, f"run.dir={tmp_path / 'r'}", "trainer.warmup_steps=0",
                             "trainer.micro_batch_size=3"])
    tr = Trainer(cfg, log=lambda *_: None)
    tr.setup()
    assert tr.head_at_positions  # a Qwen3 model: logits are lm_head(last hidden state)
    trajs = leaf_trajectories(tr.rollout(0)[0])
    adv = torch.randn(len(trajs), generator=torch.Generator().manual_seed(3))
    start = copy.deepcopy(tr.model.state_dict())
    tr.cfg.trainer.lr = 1.0  # SGD at lr 1: the step is the clipped gradient itself
    steps, stats = {}, {}
    for fast in (False, True):
        tr.model.load_state_dict(start)
        tr.optimizer = torch.optim.SGD(tr.model.parameters(), lr=1.0)
        tr.head_at_positions = fast
        stats[fast] = tr.update(trajs, adv, 0)
        steps[fast] = {k: v - start[k] for k, v in tr.model.state_dict().items()}
    assert stats[True]["loss"] == pytest.approx(stats[False]["loss"], abs=1e-6)
    assert stats[True]["logp_drift"] == pytest.approx(stats[False]["logp_drift"], abs=1e-7)
    scale = max(float(v.abs().max()) for v in steps[False].values())
    assert scale > 0
    for k in steps[False]:
        torch.testing.assert_close(steps[True][k], steps[False][k], atol=1e-4 * scale, rtol=1e-3)



def test_head_at_positions_keeps_the_ratio_at_one_off_the_trained_positions(tmp_path, monkeypatch):
    """With ppo_epochs > 1 the ratio's π_old comes from a full pass; off the trained positions the
    head-at-positions log-prob is 0, so the policy loss must see old = new there (log-ratio 0), whatever
    π_old says, or a loss without ppo_clip's clamp would get exp(−log π_old) overflows."""
    from tracerl.algos import POLICY_LOSSES
    from tracerl.algos.losses import ppo_clip

    cfg = load_config(None, [*TINY_RUN, f"run.dir={tmp_path / 'r'}", "trainer.warmup_steps=0",
                             "trainer.ppo_epochs=2"])
    tr = Trainer(cfg, log=lambda *_: None)
    tr.setup()
    trajs = leaf_trajectories(tr.rollout(0)[0])
    adv = torch.randn(len(trajs), generator=torch.Generator().manual_seed(4))
    real = tr._logprobs

    def old_pass(model, ids, attn, credit=None):  # π_old, with prompt / observation tokens absurdly unlikely
        out = real(model, ids, attn, credit)
        trained = torch.zeros_like(out)
        for i, t in enumerate(trajs):
            trained[i, : len(t.loss_mask) - 1] = torch.tensor(t.loss_mask[1:], dtype=torch.float32)
        return out - 200.0 * (1 - trained)

    seen = []

    def probe(logp, old_logp, advantages, mask, **kw):
        seen.append(float((logp - old_logp).detach().abs().masked_fill(mask.bool(), 0.0).max()))
        return ppo_clip(logp, old_logp, advantages, mask, **kw)

    monkeypatch.setitem(POLICY_LOSSES._items, "ratio_probe", probe)
    monkeypatch.setattr(tr.cfg.algo, "policy_loss", "ratio_probe")
    tr._logprobs = old_pass
    out = tr.update(trajs, adv, 0)
    assert seen and max(seen) == 0.0  # off the trained positions: log-ratio exactly 0
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
