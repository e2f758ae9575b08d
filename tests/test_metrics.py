import torch

from tracerl.algos import effective_ratio, zero_advantage_fraction


def test_effective_ratio_non_contiguous_groups():
    # groups: 7 mixed, 3 all success, 10 all failure, 42 singleton -> 1 of 4
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([7, 7, 3, 3, 10, 10, 42])
    assert effective_ratio(rewards, groups) == 0.25
    assert effective_ratio(torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([-1, -1, 5, 5])) == 1.0
    assert effective_ratio(torch.zeros(0), torch.zeros(0, dtype=torch.long)) == 0.0


def test_zero_advantage_fraction():
    adv = torch.tensor([[0.0, 0.5, 1e-9, 7.0], [0.0, 0.0, -0.3, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]])
    # on-mask values: 0, .5, 1e-9, 0, -.3 -> 3 of 5 below 1e-8
    assert zero_advantage_fraction(adv, mask) == 3 / 5
    assert zero_advantage_fraction(adv, mask, tol=1.0) == 1.0
    assert zero_advantage_fraction(adv, torch.zeros_like(mask)) == 0.0
