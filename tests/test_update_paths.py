"""The update's LM head at the trained positions only gives the same loss and gradient as full logits."""

import copy

import pytest
import torch

from conftest import TINY_RUN, with_random_advantages as _with_adv
from tracerl.config import load_config
from tracerl.packing import build_batch
from tracerl.train import Trainer


@pytest.mark.parametrize("layout", ["rows", "trees"])
def test_head_at_trained_positions_equals_full_logits(tmp_path, layout):
    cfg = load_config(None, [*TINY_RUN, f"run.dir={tmp_path / 'r'}", "trainer.warmup_steps=0",
                             "trainer.micro_batch_size=3"])
    tr = Trainer(cfg, log=lambda *_: None)
    tr.setup()
    assert tr.spec.head_at_positions  # a Qwen3 model: logits are lm_head(last hidden state)
    with_adv = _with_adv(tr.rollout(0)[0], seed=3)
    start = copy.deepcopy(tr.model.state_dict())
    tr.cfg.trainer.lr = 1.0  # SGD at lr 1: the step is the clipped gradient itself
    steps, stats = {}, {}
    for fast in (False, True):
        tr.model.load_state_dict(start)
        tr.optimizer = torch.optim.SGD(tr.model.parameters(), lr=1.0)
        tr.spec.head_at_positions = fast
        stats[fast] = tr.update(build_batch(with_adv, layout), 0)
        steps[fast] = {k: v - start[k] for k, v in tr.model.state_dict().items()}
    assert stats[True]["loss"] == pytest.approx(stats[False]["loss"], abs=1e-6)
    assert stats[True]["logp_drift"] == pytest.approx(stats[False]["logp_drift"], abs=1e-7)
    scale = max(float(v.abs().max()) for v in steps[False].values())
    assert scale > 0
    for k in steps[False]:
        torch.testing.assert_close(steps[True][k], steps[False][k], atol=1e-4 * scale, rtol=1e-3)


@pytest.mark.parametrize("layout", ["rows", "trees"])
def test_head_at_positions_keeps_the_ratio_at_one_off_the_trained_positions(tmp_path, monkeypatch, layout):
    """With ppo_epochs > 1 the ratio's π_old comes from a separate pass (`Trainer._score`), which holds
    log-probs of the scored (sampled) tokens only; every other cell of the leaf matrix the policy loss
    reads (padding after a leaf's last sampled token) must see old = new (log-ratio exactly 0), or a
    loss without ppo_clip's clamp would get exp(−log π_old) overflows."""
    from tracerl.algos import POLICY_LOSSES
    from tracerl.algos.losses import ppo_clip

    cfg = load_config(None, [*TINY_RUN, f"run.dir={tmp_path / 'r'}", "trainer.warmup_steps=0",
                             "trainer.ppo_epochs=2"])
    tr = Trainer(cfg, log=lambda *_: None)
    tr.setup()
    batch = build_batch(_with_adv(tr.rollout(0)[0], seed=4), layout)
    real = tr._score
    calls = []

    def old_pass(model, b, hook=None):  # π_old: one value per scored token of each pack, nothing else
        out = real(model, b, hook)
        assert sorted(out) == list(range(len(b.packs)))
        assert all(out[k].shape == b.packs[k].tgt.shape for k in out)
        calls.append(len(out))
        return out

    seen, padding = [], []

    def probe(logp, old_logp, advantages, mask, **kw):
        off = ~mask.bool()
        padding.append(int(off.sum()))
        seen.append(float((logp - old_logp).detach().abs().masked_fill(~off, 0.0).max()))
        return ppo_clip(logp, old_logp, advantages, mask, **kw)

    monkeypatch.setitem(POLICY_LOSSES._items, "ratio_probe", probe)
    monkeypatch.setattr(tr.spec, "policy_loss", "ratio_probe")
    monkeypatch.setattr(tr, "_score", old_pass)
    out = tr.update(batch, 0)
    assert calls == [len(batch.packs)]  # one π_old pass, before the first optimizer step
    assert seen and max(seen) == 0.0  # off the trained positions: log-ratio exactly 0
    assert sum(padding) > 0  # leaves of different lengths: there are such cells
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
