import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tracerl.algos import ADVANTAGES, broadcast_to_tokens
from tracerl.algos.advantages import dr_grpo, grpo


def test_grpo_hand_values_two_groups():
    # group 5: [1,0,0,1] mean .5, unbiased std sqrt(1/3)=.57735 -> ±.86603
    # group 2: [1,0,0]   mean 1/3, unbiased std sqrt(1/3)     -> 1.15470, -.57735
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([5, 5, 2, 2, 5, 5, 2])
    adv = grpo(rewards, groups)
    expected = torch.tensor([0.86603, -0.86603, 1.15470, -0.57735, -0.86603, 0.86603, -0.57735])
    torch.testing.assert_close(adv, expected, atol=1e-4, rtol=0)
    assert adv.dtype == torch.float32


def test_grpo_eps_is_added_to_std():
    adv = grpo(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), eps=1.0)
    # std of [1,0] (unbiased) = .70711; .5 / 1.70711 = .29289
    torch.testing.assert_close(adv, torch.tensor([0.29289, -0.29289]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo"])
def test_all_equal_group_is_exactly_zero(name):
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 0.0])
    adv = ADVANTAGES.get(name)(rewards, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.equal(adv[:3], torch.zeros(3))
    assert (adv[3:] != 0).all()


@pytest.mark.parametrize("name", ["grpo", "dr_grpo"])
def test_singleton_group_zero_or_raw(name):
    fn = ADVANTAGES.get(name)
    rewards = torch.tensor([1.0, 0.7, 1.0, 0.0])
    groups = torch.tensor([9, -4, 3, 3])
    zero = fn(rewards, groups)
    assert torch.equal(zero[:2], torch.zeros(2))
    raw = fn(rewards, groups, singleton="raw")
    torch.testing.assert_close(raw[:2], torch.tensor([1.0, 0.7]))
    torch.testing.assert_close(raw[2:], zero[2:])
    with pytest.raises(ValueError, match="zero, raw"):
        fn(rewards, groups, singleton="mean")


def test_dr_grpo_is_centred_reward():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([100, 100, 100, 100, 7, 7, 7])
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 2 / 3, -1 / 3, -1 / 3])
    torch.testing.assert_close(dr_grpo(rewards, groups), expected)


def test_integer_rewards_and_shape_errors():
    adv = grpo(torch.tensor([1, 0]), torch.tensor([0, 0]))
    assert adv.is_floating_point()
    with pytest.raises(ValueError, match=r"\(N,\)"):
        grpo(torch.zeros(3), torch.zeros(4, dtype=torch.long))


def test_registry_names_and_unknown():
    assert ADVANTAGES.names() == ["dr_grpo", "grpo", "tree_grpo", "treepo"]
    with pytest.raises(ValueError, match="valid: dr_grpo, grpo"):
        ADVANTAGES.get("ppo")


def test_broadcast_to_tokens():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert torch.equal(out, torch.tensor([[0.0, 2.0, 2.0, 0.0], [-1.0, -1.0, 0.0, 0.0]]))


groups_strategy = st.lists(
    st.tuples(st.integers(-50, 50), st.sampled_from([0.0, 1.0, 0.25])), min_size=1, max_size=20
)


@settings(max_examples=40, deadline=None)
@given(groups_strategy, st.randoms(use_true_random=False))
def test_grpo_invariants(items, rnd):
    groups = torch.tensor([g for g, _ in items])
    rewards = torch.tensor([r for _, r in items])
    adv = grpo(rewards, groups)
    # zero mean within every group
    for g in groups.unique():
        assert abs(adv[groups == g].sum().item()) < 1e-4
    # permuting rows permutes the output; relabelling groups changes nothing
    perm = list(range(len(items)))
    rnd.shuffle(perm)
    perm_t = torch.tensor(perm)
    torch.testing.assert_close(grpo(rewards[perm_t], groups[perm_t]), adv[perm_t])
    torch.testing.assert_close(grpo(rewards, groups * 3 + 1000), adv)


def _z(values, eps=1e-6):
    import statistics

    m, s = statistics.mean(values), statistics.stdev(values)
    return [(v - m) / (s + eps) for v in values]


def test_tree_grpo_is_intra_plus_inter_z_scores_by_hand():
    from tracerl.algos.advantages import tree_grpo

    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    trees = torch.tensor([0, 0, 0, 1, 1, 1])
    prompt = torch.zeros(6, dtype=torch.long)
    intra = _z([1, 0, 0]) + _z([1, 1, 0])
    inter = _z([1, 0, 0, 1, 1, 0])
    expected = torch.tensor([a + b for a, b in zip(intra, inter)])
    torch.testing.assert_close(tree_grpo(r, prompt, tree_ids=trees), expected, atol=1e-6, rtol=0)
    weighted = tree_grpo(r, prompt, tree_ids=trees, w_intra=0.5, w_inter=2.0)
    torch.testing.assert_close(weighted, torch.tensor([0.5 * a + 2 * b for a, b in zip(intra, inter)]), atol=1e-6, rtol=0)
    # an all-equal tree contributes 0 intra; a one-leaf tree 0 (or its raw reward with singleton="raw")
    r2, t2 = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0, 0, 1])
    inter2 = _z([1, 1, 0])
    torch.testing.assert_close(tree_grpo(r2, torch.zeros(3, dtype=torch.long), tree_ids=t2), torch.tensor(inter2),
                               atol=1e-6, rtol=0)
    raw = tree_grpo(r2, torch.zeros(3, dtype=torch.long), tree_ids=t2, singleton="raw")
    torch.testing.assert_close(raw, torch.tensor([inter2[0], inter2[1], 0.0 + inter2[2]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="tree_ids"):
        tree_grpo(r, prompt)


def test_treepo_averages_z_scores_over_ancestor_subgroups_by_hand():
    from tracerl.algos.advantages import treepo

    # prompt P=0 with one tree: root T=10 holds leaves l1, l2 (below node X=11) and l3 (a root chain);
    # l4 sits alone below node Y=12, a one-leaf sub-group that is skipped.
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    anc = [[0, 10, 11], [0, 10, 11], [0, 10], [0, 10, 12]]
    zp = _z([1, 0, 0, 1])
    zx = _z([1, 0])
    expected = [(2 * zp[0] + zx[0]) / 3, (2 * zp[1] + zx[1]) / 3, zp[2], zp[3]]
    torch.testing.assert_close(treepo(r, torch.zeros(4, dtype=torch.long), ancestors=anc), torch.tensor(expected),
                               atol=1e-6, rtol=0)
    # all-equal sub-groups give 0 but still count; no sub-group of two gives 0
    out = treepo(torch.tensor([1.0, 1.0, 0.0]), torch.zeros(3, dtype=torch.long), ancestors=[[0, 5], [0, 5], [9]])
    torch.testing.assert_close(out, torch.zeros(3), atol=0, rtol=0)
