"""The one prediction -> noise conversion (epsilon, v_prediction, flow)."""

from __future__ import annotations

import pytest
import torch

from t2ialign.core.errors import ConfigError
from t2ialign.core.prediction import eps_from_prediction


def test_conversions_recover_the_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 5, 6, generator=gen).double()
    sigma = torch.rand(5, 1, generator=gen).double() * 0.98 + 0.01
    # variance preserving: v = alpha eps - sigma x
    alpha = (1 - sigma ** 2).sqrt()
    z = alpha * x + sigma * eps
    assert torch.allclose(eps_from_prediction("epsilon", eps, z, alpha, sigma), eps)
    assert torch.allclose(eps_from_prediction("v_prediction", alpha * eps - sigma * x, z, alpha, sigma), eps)
    # rectified flow: alpha = 1 - sigma, v = eps - x
    alpha = 1 - sigma
    z = alpha * x + sigma * eps
    assert torch.allclose(eps_from_prediction("flow", eps - x, z, alpha, sigma), eps)
    assert torch.allclose(eps_from_prediction("flow", eps - x, z, alpha, sigma), z + (1 - sigma) * (eps - x))
    with pytest.raises(ConfigError, match="unknown prediction type"):
        eps_from_prediction("x0", x, z, alpha, sigma)
