"""Tests of the gamma-norm alignment scores and attention calibration (method-spec §5)."""

from __future__ import annotations

import pytest
import torch

from t2ialign.core.calibration import alignment_scores, calibrate, fixed_scores, minmax
from t2ialign.core.errors import ConfigError, InputError


def test_figure_example() -> None:
    """Project-page figure: losses (5.10, 5.20, 5.19, 5.22) with gamma = 1/5."""
    s = alignment_scores(torch.tensor([5.10, 5.20, 5.19, 5.22]), 1 / 5)
    assert s.tolist() == pytest.approx([1.0, 0.2 ** (0.10 / 0.12), 0.2 ** (0.09 / 0.12), 0.2], abs=1e-6)
    assert s.tolist() == pytest.approx([1.0, 0.262, 0.299, 0.2], abs=1e-3)
    # the final default gamma = 1/3
    assert alignment_scores(torch.tensor([5.10, 5.20, 5.19, 5.22]), 1 / 3).tolist() == pytest.approx(
        [1.0, 0.40, 0.44, 0.333], abs=5e-3)


@pytest.mark.parametrize("losses", [[3.0], [2.0, 2.0, 2.0], [1.0, 7.0]])
def test_degenerate_cases_are_ones_or_gamma_never_nan(losses: list[float]) -> None:
    s = alignment_scores(torch.tensor(losses), 1 / 3)
    assert torch.isfinite(s).all()
    if len(set(losses)) == 1:
        assert torch.equal(s, torch.ones(len(losses)))
    else:
        assert s.tolist() == pytest.approx([1.0, 1 / 3])


def test_gamma_one_disables_and_scores_are_shift_scale_invariant() -> None:
    losses = torch.tensor([0.3, 0.1, 0.7])
    assert torch.equal(alignment_scores(losses, 1.0), torch.ones(3))
    a = alignment_scores(losses, 0.5)
    assert torch.allclose(alignment_scores(4.0 * losses + 11.0, 0.5), a)
    assert a.argmax() == 1 and a.argmin() == 2


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.5, float("nan"), "1/3", True])
def test_bad_gamma(gamma: object) -> None:
    with pytest.raises(ConfigError, match="gamma"):
        alignment_scores(torch.tensor([1.0, 2.0]), gamma)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="gamma"):
        fixed_scores(2, gamma)  # type: ignore[arg-type]


@pytest.mark.parametrize("losses", [torch.tensor([]), torch.ones(2, 2), torch.tensor([1.0, float("nan")])])
def test_bad_losses(losses: torch.Tensor) -> None:
    with pytest.raises(InputError):
        alignment_scores(losses, 0.5)


def test_fixed_scores() -> None:
    assert torch.equal(fixed_scores(3, 0.25), torch.full((3,), 0.25))
    assert fixed_scores(0, 0.5).shape == (0,)
    with pytest.raises(InputError):
        fixed_scores(-1, 0.5)


def test_minmax_global_per_dim_and_constant() -> None:
    x = torch.tensor([[1.0, 3.0], [5.0, 5.0]])
    assert torch.allclose(minmax(x), torch.tensor([[0.0, 0.5], [1.0, 1.0]]))
    assert torch.allclose(minmax(x, dim=1), torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    assert torch.equal(minmax(torch.full((3, 3), 7.0)), torch.zeros(3, 3))
    half = minmax(torch.full((4,), 2.0, dtype=torch.float16))
    assert half.dtype == torch.float16 and torch.equal(half, torch.zeros(4, dtype=torch.float16))
    assert minmax(torch.tensor([2, 4, 6])).tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_calibrate_powers_each_normalised_map() -> None:
    maps = torch.stack([torch.linspace(2.0, 4.0, 5), torch.linspace(-1.0, 1.0, 5)]).reshape(2, 1, 5)
    scores = torch.tensor([1.0, 0.5])
    out = calibrate(maps, scores)
    base = torch.linspace(0.0, 1.0, 5)
    assert torch.allclose(out[0, 0], base, atol=1e-6)  # S = 1: untouched (just normalised)
    assert torch.allclose(out[1, 0], base ** 2, atol=1e-6)  # S = 1/2: squared, peak stays 1
    assert torch.allclose(out.amax(dim=(1, 2)), torch.ones(2))
    # constant map: zeros, not NaN
    flat = calibrate(torch.ones(1, 3, 3), torch.tensor([0.5]))
    assert torch.equal(flat, torch.zeros(1, 3, 3))


def test_prefactor_is_a_per_class_scale_that_minmax_cancels() -> None:
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 4, 4, generator=gen)
    scores = torch.tensor([1.0, 0.6, 0.3])
    plain = calibrate(maps, scores)
    with_p = calibrate(maps, scores, prefactor_exponent=2.0)
    assert torch.allclose(with_p, plain * scores.reshape(3, 1, 1) ** 0.5)
    assert not torch.allclose(with_p, plain)
    # released pipeline: linear self-attention propagation, then per-class min-max
    k = torch.softmax(torch.randn(16, 16, generator=gen), dim=1)
    prop = lambda a: minmax((a.reshape(3, 16) @ k.T), dim=1)  # noqa: E731
    assert torch.allclose(prop(with_p), prop(plain), atol=1e-6)


def test_calibrate_rejects_mismatched_or_invalid_scores() -> None:
    with pytest.raises(InputError, match="does not match"):
        calibrate(torch.rand(3, 4, 4), torch.ones(2))
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        calibrate(torch.rand(2, 4, 4), torch.tensor([1.0, 0.0]))
    with pytest.raises(InputError, match="at least one map dimension"):
        calibrate(torch.rand(3), torch.ones(3))
    with pytest.raises(ConfigError, match="prefactor_exponent"):
        calibrate(torch.rand(2, 4, 4), torch.ones(2), prefactor_exponent=0.0)
