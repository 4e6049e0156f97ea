"""Tests of the ELBO engine, validated against exact Gaussian log-likelihoods.

The analytic backbone below has a known data law per class, ``x ~ N(mu_c, s^2 I)``, and its
denoiser is the EXACT posterior mean for the conditioning class, written in the epsilon, v and
flow parametrisations. For such a model the continuous-time ELBO is tight, so the ``elbo``
scheme must recover ``log N(x; mu_1, s^2 I) - log N(x; mu_2, s^2 I)`` up to Monte-Carlo error
(and a truncation bias outside the schedule's log-SNR range, computed in closed form below).

The analytic backbone lives in ``tests/helpers/gaussian.py`` (``benchmarks/elbo_accuracy.py`` uses it too).
"""

from __future__ import annotations

import math

import pytest
import torch

from t2ialign.core.elbo import estimate_class_losses
from t2ialign.core.errors import InputError, NumericalError
from t2ialign.core.protocols import Backbone, TextCond
from t2ialign.core.timesteps import parse_timesteps
from t2ialign.plugins.weightings import ELBOWeighting, UniformWeighting

from tests.helpers.gaussian import LATENT, GaussianBackbone, elbo_estimate, gaussian_problem  # noqa: E402


# ============================================================================================
# analytic validation
# ============================================================================================
PARAMS = ("epsilon", "v_prediction", "flow")
N_VALIDATION = 1000
PAIRS = [(0, 1), (0, 2), (1, 2)]


def test_analytic_backbone_satisfies_protocol() -> None:
    backbone, _, _ = gaussian_problem("epsilon")
    assert isinstance(backbone, Backbone)


@pytest.mark.parametrize("prediction_type", PARAMS)
def test_elbo_recovers_exact_log_likelihood_difference(prediction_type: str) -> None:
    backbone, x, res = elbo_estimate(prediction_type, N_VALIDATION)
    for i, j in PAIRS:
        exact = backbone.log_lik_diff(x, i, j)
        truncated = backbone.truncated_log_lik_diff(x, i, j)
        est = res.log_likelihood_diff(i, j)
        se = float(res.diff_se[i, j])
        print(f"[{prediction_type}] log p(x|c{i}) - log p(x|c{j}): exact {exact:.4f}  estimate {est:.4f}  "
              f"|error| {abs(est - exact):.4f}  diff_se {se:.4f}  truncation bias {exact - truncated:.5f}")
        # the integrand outside the schedule's lambda range is negligible at these parameters
        assert abs(exact - truncated) < 0.25 * se
        assert abs(est - exact) < 3 * se
        # teeth: a factor-2 slip (e.g. a missing 1/2) or a wrong t-weighting would be caught
        assert 3 * se < 0.5 * abs(exact)


def test_three_parametrisations_agree() -> None:
    # independent seeds, so that epsilon vs v (same schedule) is not trivially identical
    results = {p: elbo_estimate(p, N_VALIDATION, seed=k)[2] for k, p in enumerate(PARAMS)}
    for a, b in [("epsilon", "v_prediction"), ("epsilon", "flow"), ("v_prediction", "flow")]:
        for i, j in PAIRS:
            da, db = results[a].log_likelihood_diff(i, j), results[b].log_likelihood_diff(i, j)
            combined = math.hypot(float(results[a].diff_se[i, j]), float(results[b].diff_se[i, j]))
            print(f"{a} vs {b} ({i},{j}): {da:.4f} vs {db:.4f}, combined se {combined:.4f}")
            assert da != db
            assert abs(da - db) < 3 * combined


@pytest.mark.parametrize("prediction_type", PARAMS)
def test_uniform_ranks_correctly_but_is_not_a_log_likelihood(prediction_type: str) -> None:
    backbone, x, cond = gaussian_problem(prediction_type)
    grid = parse_timesteps([[1, 999, 50]])
    res = estimate_class_losses(backbone, UniformWeighting(prediction_type), x, cond, grid, seed=0)
    exact = torch.tensor([backbone.log_lik_diff(x, 0, k) for k in range(3)])  # log p(x|c0) - log p(x|ck)
    # ranking: lower loss <=> higher exact likelihood
    assert torch.equal(torch.argsort(res.loss), torch.argsort(exact))
    for k in (1, 2):
        ratio = res.log_likelihood_diff(0, k) / float(exact[k])
        print(f"[{prediction_type}] uniform diff / exact log-lik diff (0,{k}) = {ratio:.4f}")
        assert ratio > 0
        assert ratio < 0.2  # off by far more than any Monte-Carlo error: it is a different quantity


# ============================================================================================
# engine mechanics
# ============================================================================================
def _small(prediction_type: str = "v_prediction") -> tuple[GaussianBackbone, torch.Tensor, TextCond]:
    return gaussian_problem(prediction_type, n_classes=3)


@pytest.mark.parametrize("scheme", [UniformWeighting, ELBOWeighting])
def test_batch_size_never_changes_the_result(scheme: type) -> None:
    backbone, x, cond = _small()
    grid = [1, 201, 401, 601, 801]  # C = 3 classes x T = 5 timesteps
    results = [estimate_class_losses(backbone, scheme("v_prediction"), x, cond, grid, batch_size=bs, seed=3)
               for bs in (1, 3, 7, 64)]
    for other in results[1:]:
        for field in ("loss", "se", "diff_se", "terms", "t"):
            assert torch.equal(getattr(results[0], field), getattr(other, field)), field


def test_deterministic_given_seed_and_seeds_differ() -> None:
    backbone, x, cond = _small()
    w = ELBOWeighting("v_prediction")
    a = estimate_class_losses(backbone, w, x, cond, range(6), seed=11)
    b = estimate_class_losses(backbone, w, x, cond, range(6), seed=11)
    c = estimate_class_losses(backbone, w, x, cond, range(6), seed=12)
    assert torch.equal(a.terms, b.terms) and torch.equal(a.t, b.t)
    assert not torch.equal(a.terms, c.terms)
    assert not torch.equal(a.t, c.t)
    # an explicit generator is used as is
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    d = estimate_class_losses(backbone, w, x, cond, range(6), generator=g1)
    e = estimate_class_losses(backbone, w, x, cond, range(6), generator=g2)
    assert torch.equal(d.terms, e.terms) and torch.equal(d.terms, a.terms)


def test_uniform_terms_match_an_independent_computation() -> None:
    """Reference parity: term = mean (eps_hat - eps)^2 with one noise per timestep shared by classes."""
    backbone, x, cond = _small("epsilon")
    grid = parse_timesteps([[1, 999, 200]])
    res = estimate_class_losses(backbone, UniformWeighting("epsilon"), x, cond, grid, batch_size=4, seed=5)
    gen = torch.Generator().manual_seed(5)  # the uniform plan draws nothing, so noises come first
    noises = [torch.randn(LATENT, generator=gen) for _ in grid]
    for c in range(3):
        for k, (t, eps) in enumerate(zip(grid, noises)):
            tt = torch.tensor([float(t)])
            z_t = backbone.add_noise(x, tt, eps[None])
            eps_hat = backbone.predict(z_t, tt, cond.select([c]))
            assert res.terms[c, k].item() == pytest.approx((eps_hat - eps).pow(2).mean().item(), rel=1e-6)
    assert torch.allclose(res.loss, res.terms.mean(dim=1))
    assert torch.equal(res.t, torch.tensor(grid, dtype=torch.float32))


def test_standard_errors_follow_their_definitions() -> None:
    backbone, x, cond = _small()
    res = estimate_class_losses(backbone, ELBOWeighting("v_prediction"), x, cond, range(10), seed=1)
    n_t = res.terms.shape[1]
    assert torch.allclose(res.se, res.terms.std(dim=1) / math.sqrt(n_t))
    paired = (res.terms[0] - res.terms[2]).std() / math.sqrt(n_t)
    assert res.diff_se[0, 2].item() == pytest.approx(paired.item())
    assert torch.equal(res.diff_se, res.diff_se.T)
    assert torch.all(res.diff_se.diagonal() == 0)
    # the shared noise is what makes paired differences much more precise than the losses
    assert res.diff_se[0, 2] < res.se[0]
    assert res.log_likelihood_diff(0, 2) == pytest.approx(float(res.loss[2] - res.loss[0]))


def test_single_timestep_has_unknown_standard_error() -> None:
    backbone, x, cond = _small()
    res = estimate_class_losses(backbone, UniformWeighting("v_prediction"), x, cond, [500])
    assert torch.isinf(res.se).all()
    assert torch.isinf(res.diff_se[0, 1]) and res.diff_se[1, 1] == 0
    assert torch.isfinite(res.loss).all()


def test_accepts_unbatched_latent() -> None:
    backbone, x, cond = _small()
    w = UniformWeighting("v_prediction")
    a = estimate_class_losses(backbone, w, x, cond, [1, 501])
    b = estimate_class_losses(backbone, w, x[0], cond, [1, 501])
    assert torch.equal(a.terms, b.terms)


def test_nan_prediction_raises_numerical_error() -> None:
    means = torch.zeros(2, math.prod(LATENT))
    backbone = GaussianBackbone("epsilon", means, 1.0, nan_at=600.0)
    cond = backbone.encode_text(["c0", "c1"])
    with pytest.raises(NumericalError, match="denoiser prediction"):
        estimate_class_losses(backbone, UniformWeighting("epsilon"), torch.zeros(1, *LATENT), cond, [1, 701])


@pytest.mark.parametrize("z0_shape", [(2, 4, 4, 4), (64,)])
def test_rejects_more_than_one_image(z0_shape: tuple[int, ...]) -> None:
    backbone, _, cond = _small()
    with pytest.raises(InputError, match="ONE latent"):
        estimate_class_losses(backbone, UniformWeighting("v_prediction"), torch.zeros(z0_shape), cond, [1])


@pytest.mark.parametrize("batch_size", [0, -2, 1.5, True])
def test_rejects_bad_batch_size(batch_size: object) -> None:
    backbone, x, cond = _small()
    with pytest.raises(InputError, match="batch_size"):
        estimate_class_losses(backbone, UniformWeighting("v_prediction"), x, cond, [1],
                              batch_size=batch_size)  # type: ignore[arg-type]
