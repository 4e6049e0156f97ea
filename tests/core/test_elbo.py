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


# ============================================================================================
# antithetic noise pairs
# ============================================================================================
class _RecordingGaussian(GaussianBackbone):
    """The analytic backbone, remembering every (t, noise) the engine noises a latent with."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add_noise(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self.seen.append((t.clone(), noise.clone()))
        return super().add_noise(z0, t, noise)


def _recording(prediction_type: str = "epsilon") -> tuple[_RecordingGaussian, torch.Tensor, TextCond]:
    base, x, cond = gaussian_problem(prediction_type, n_classes=3)
    return _RecordingGaussian(prediction_type, base.means, base.s), x, cond


@pytest.mark.parametrize("scheme", [UniformWeighting, ELBOWeighting])
def test_antithetic_pairs_are_negated_and_reuse_the_plain_draws(scheme: type) -> None:
    backbone, x, cond = _recording()
    grid = [1, 301, 601, 901]
    plain = estimate_class_losses(backbone, scheme("epsilon"), x, cond, grid, batch_size=5, seed=4)
    plain_noise = torch.cat([n for _, n in backbone.seen])[: len(grid)]  # class 0's rows
    backbone.seen.clear()
    anti = estimate_class_losses(backbone, scheme("epsilon"), x, cond, grid, batch_size=5, seed=4, antithetic=True)
    t_seen = torch.cat([t for t, _ in backbone.seen])
    noise_seen = torch.cat([n for _, n in backbone.seen])
    n = 2 * len(grid)
    assert anti.terms.shape == (3, n) and anti.t.numel() == n and anti.antithetic and not plain.antithetic
    assert t_seen.numel() == 3 * n  # C x 2T sample-forwards, class-major
    for c in range(3):
        t_c, eps_c = t_seen[c * n:(c + 1) * n], noise_seen[c * n:(c + 1) * n]
        assert torch.equal(t_c[0::2], t_c[1::2]), "both members of a pair share the timestep"
        assert torch.equal(eps_c[1::2], -eps_c[0::2]), "the second member's noise is the negated first"
        assert torch.equal(eps_c[0::2], plain_noise), "first members are the plain estimator's draws"
    assert torch.equal(anti.t[0::2], plain.t) and torch.equal(anti.t[1::2], plain.t)
    assert torch.allclose(anti.terms[:, 0::2], plain.terms)
    assert not torch.allclose(anti.terms[:, 1::2], plain.terms)


def test_antithetic_standard_errors_use_the_pair_means() -> None:
    backbone, x, cond = _small()
    res = estimate_class_losses(backbone, ELBOWeighting("v_prediction"), x, cond, range(8), seed=2, antithetic=True)
    pairs = res.terms.reshape(3, 8, 2).mean(dim=2)
    assert torch.allclose(res.loss, res.terms.mean(dim=1))
    assert torch.allclose(res.se, pairs.std(dim=1) / math.sqrt(8))
    assert res.diff_se[0, 2].item() == pytest.approx(((pairs[0] - pairs[2]).std() / math.sqrt(8)).item())
    one = estimate_class_losses(backbone, ELBOWeighting("v_prediction"), x, cond, [500], antithetic=True)
    assert one.terms.shape == (3, 2) and torch.isinf(one.se).all()  # one pair: one independent draw


@pytest.mark.parametrize("prediction_type", PARAMS)
def test_antithetic_elbo_is_unbiased_at_few_samples(prediction_type: str) -> None:
    """Mean over seeds of 3-pair estimates = the exact (truncated) log-likelihood difference."""
    backbone, x, cond = gaussian_problem(prediction_type)
    w = ELBOWeighting(prediction_type)
    for i, j in PAIRS:
        truth = backbone.truncated_log_lik_diff(x, i, j)
        ests = torch.tensor([estimate_class_losses(backbone, w, x, cond, range(3), seed=s, antithetic=True,
                                                   batch_size=64).log_likelihood_diff(i, j) for s in range(200)])
        sem = float(ests.std() / math.sqrt(len(ests)))
        print(f"[{prediction_type}] pair {i}{j}: exact {truth:.3f} mean {float(ests.mean()):.3f} sem {sem:.3f}")
        assert abs(float(ests.mean()) - truth) < 3.5 * sem + 0.01 * abs(truth)
        # teeth: a missing or doubled weight would move the mean by |truth| / 2 or more
        assert 3.5 * sem + 0.01 * abs(truth) < 0.25 * abs(truth)


def _difference_variance(losses: list[torch.Tensor]) -> torch.Tensor:
    d = torch.stack(losses)
    return torch.stack([d[:, i] - d[:, j] for i, j in PAIRS], dim=1).var(dim=0)


@pytest.mark.parametrize("scheme", ["uniform", "elbo"])
def test_antithetic_variance_is_not_larger_on_the_same_timesteps(scheme: str) -> None:
    """Same plan (same seed: same timesteps, same first noises): the pair mean never scatters more."""
    backbone, x, cond = gaussian_problem("epsilon")
    w = UniformWeighting("epsilon") if scheme == "uniform" else ELBOWeighting("epsilon")
    plain, anti = [], []
    for s in range(60):
        grid = parse_timesteps([["stratified", 1, 999, 5]], seed=s)
        plain.append(estimate_class_losses(backbone, w, x, cond, grid, seed=s, batch_size=64).loss)
        anti.append(estimate_class_losses(backbone, w, x, cond, grid, seed=s, batch_size=64, antithetic=True).loss)
    v_plain, v_anti = _difference_variance(plain), _difference_variance(anti)
    print(f"[{scheme}] variance of class differences, plain {v_plain.tolist()} antithetic {v_anti.tolist()}")
    assert bool((v_anti <= v_plain).all())


def test_antithetic_elbo_variance_is_not_larger_at_equal_forwards() -> None:
    """10 sample-forwards per class: 5 antithetic pairs vs 10 independent noises (``elbo`` scheme).

    Not a theorem: halving the number of distinct timesteps doubles the timestep part of the
    variance. For the ``uniform`` scheme on this Gaussian that part dominates and antithetic pairs
    at equal forwards scatter MORE (docs/elbo.md, "The fast preset"); for ``elbo`` the
    noise-linear part dominates and cancels.
    """
    backbone, x, cond = gaussian_problem("epsilon")
    w = ELBOWeighting("epsilon")
    plain = [estimate_class_losses(backbone, w, x, cond, range(10), seed=s, batch_size=64).loss for s in range(60)]
    anti = [estimate_class_losses(backbone, w, x, cond, range(5), seed=s, batch_size=64, antithetic=True).loss
            for s in range(60)]
    v_plain, v_anti = _difference_variance(plain), _difference_variance(anti)
    print(f"variance of class differences, plain {v_plain.tolist()} antithetic {v_anti.tolist()}")
    assert bool((v_anti <= v_plain).all())


@pytest.mark.parametrize("value", [1, "yes", None])
def test_rejects_non_boolean_antithetic(value: object) -> None:
    backbone, x, cond = _small()
    with pytest.raises(InputError, match="antithetic"):
        estimate_class_losses(backbone, UniformWeighting("v_prediction"), x, cond, [1],
                              antithetic=value)  # type: ignore[arg-type]
