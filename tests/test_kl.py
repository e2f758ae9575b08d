import pytest
import torch

from tracerl.algos import KL_ESTIMATORS
from tracerl.algos.kl import k1, k2, k3

LOGP = torch.tensor([[-1.0, -2.0, -0.5]])
REF = torch.tensor([[-2.0, -1.0, -0.5]])


def test_hand_values():
    torch.testing.assert_close(k1(LOGP, REF), torch.tensor([[1.0, -1.0, 0.0]]))
    torch.testing.assert_close(k2(LOGP, REF), torch.tensor([[0.5, 0.5, 0.0]]))
    # d = ref − logp: exp(−1)+1−1 = 0.367879, exp(1)−1−1 = 0.718282, d = 0 -> 0
    torch.testing.assert_close(k3(LOGP, REF), torch.tensor([[0.367879, 0.718282, 0.0]]), atol=1e-6, rtol=0)


def test_k3_non_negative_and_clamped_with_finite_gradient():
    torch.manual_seed(0)
    logp = (torch.randn(4, 50) * 10).requires_grad_(True)
    ref = torch.randn(4, 50) * 10
    out = k3(logp, ref)
    assert (out >= 0).all() and (out <= 10).all()
    out.sum().backward()
    assert torch.isfinite(logp.grad).all()
    extreme = k3(torch.tensor([[-300.0, 0.0]]), torch.tensor([[0.0, -300.0]]))
    assert torch.equal(extreme, torch.tensor([[10.0, 10.0]]))


def test_registry():
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    assert KL_ESTIMATORS.get("k3") is k3
    with pytest.raises(ValueError, match="valid: k1, k2, k3"):
        KL_ESTIMATORS.get("low_var_kl")
