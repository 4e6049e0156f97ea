"""Tests of the built-in ELBO weightings plugin (epsilon / v / flow x uniform / elbo)."""

from __future__ import annotations

import math

import pytest
import torch

from t2ialign.core.errors import ConfigError, NumericalError, PluginError
from t2ialign.core.host import Host
from t2ialign.core.protocols import Weighting
from t2ialign.plugins.weightings import ELBOWeighting, UniformWeighting

PARAMS = ("epsilon", "v_prediction", "flow")


class ScheduleOnly:
    """The part of a backbone a plan looks at: a named schedule over 1000 timesteps."""

    device = torch.device("cpu")
    num_train_timesteps = 1000

    def __init__(self, kind: str = "linear"):
        self.name = f"schedule-{kind}"
        self.kind = kind

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        t = t.double()
        if self.kind == "linear":  # lambda from +6 at t=0 down to -6 at t=999
            return 6.0 - 12.0 * t / 999.0
        if self.kind == "flow":  # SD3 shifted table; lambda = -inf at t = 999
            s = (t + 1.0) / 1000.0
            sigma = 3.0 * s / (1.0 + 2.0 * s)
            return 2.0 * (torch.log1p(-sigma) - torch.log(sigma))
        return torch.cos(t / 100.0)  # "broken": not monotone


@pytest.fixture(scope="module")
def host() -> Host:
    return Host()


def test_plugin_lists_all_six_and_host_builds_them(host: Host) -> None:
    record = host.plugins.record("weightings")
    assert record is not None and record.status == "loaded"
    assert sorted(record.info.provides["weightings"]) == sorted(f"{p}/{s}" for p in PARAMS for s in ("uniform", "elbo"))
    for p in PARAMS:
        for scheme, cls in (("uniform", UniformWeighting), ("elbo", ELBOWeighting)):
            w = host.weighting(p, scheme)
            assert isinstance(w, cls) and isinstance(w, Weighting)
            assert (w.prediction_type, w.scheme) == (p, scheme)


@pytest.mark.parametrize(("prediction_type", "scheme"), [("x0", "elbo"), ("epsilon", "simpson")])
def test_unknown_requests_are_not_answered(host: Host, prediction_type: str, scheme: str) -> None:
    with pytest.raises(PluginError, match="no plugin could build"):
        host.weighting(prediction_type, scheme)


def _case() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    z0, noise, pred = torch.randn(3, 2, 4, 3, 3, generator=gen)
    alpha = torch.tensor([0.9, 0.5]).reshape(2, 1, 1, 1)
    sigma = 1 - alpha
    return dict(pred=pred, z0=z0, noise=noise, z_t=alpha * z0 + sigma * noise, alpha=alpha, sigma=sigma)


def test_uniform_terms_are_elementwise_means() -> None:
    c = _case()
    kw = {k: v for k, v in c.items() if k != "pred"}
    eps_term = UniformWeighting("epsilon").term(c["pred"], **kw)
    assert torch.allclose(eps_term, (c["pred"] - c["noise"]).pow(2).mean(dim=(1, 2, 3)))
    # flow: plain velocity MSE against noise - z0, NOT converted to epsilon space
    flow_term = UniformWeighting("flow").term(c["pred"], **kw)
    assert torch.allclose(flow_term, ((c["noise"] - c["z0"]) - c["pred"]).pow(2).mean(dim=(1, 2, 3)))
    assert eps_term.shape == (2,)


def test_elbo_terms_are_epsilon_space_sums() -> None:
    c = _case()
    kw = {k: v for k, v in c.items() if k != "pred"}
    flow_term = ELBOWeighting("flow").term(c["pred"], **kw)
    eps_hat = c["z_t"] + (1 - c["sigma"]) * c["pred"]
    assert torch.allclose(flow_term, (eps_hat - c["noise"]).pow(2).sum(dim=(1, 2, 3)))
    eps_term = ELBOWeighting("epsilon").term(c["pred"], **kw)
    assert torch.allclose(eps_term, 36 * UniformWeighting("epsilon").term(c["pred"], **kw))


def test_uniform_plan_is_the_grid_and_checks_its_range() -> None:
    plan = UniformWeighting("epsilon").plan(ScheduleOnly(), torch.tensor([1, 51, 951]), torch.Generator())
    assert torch.equal(plan.t, torch.tensor([1.0, 51.0, 951.0]))
    assert torch.equal(plan.weight, torch.ones(3))
    with pytest.raises(ConfigError, match=r"\[0, 999\]"):
        UniformWeighting("epsilon").plan(ScheduleOnly(), torch.tensor([1, 1000]), torch.Generator())
    with pytest.raises(ConfigError, match="empty"):
        UniformWeighting("epsilon").plan(ScheduleOnly(), torch.tensor([]), torch.Generator())


def test_elbo_plan_is_stratified_deterministic_and_inside_the_schedule() -> None:
    w, sched = ELBOWeighting("epsilon"), ScheduleOnly()
    a = w.plan(sched, torch.zeros(50), torch.Generator().manual_seed(3))
    b = w.plan(sched, torch.zeros(50), torch.Generator().manual_seed(3))
    c = w.plan(sched, torch.zeros(50), torch.Generator().manual_seed(4))
    assert torch.equal(a.t, b.t) and torch.equal(a.weight, b.weight)
    assert not torch.equal(a.t, c.t)
    assert a.t.shape == a.weight.shape == (50,)
    assert bool((a.t >= 0).all()) and bool((a.t <= 999).all())
    lam = sched.log_snr(a.t)
    # one draw per stratum of the proposal CDF, in increasing lambda order
    cdf = torch.sigmoid(lam / w.scale)
    lo, hi = torch.sigmoid(torch.tensor(-6.0 / w.scale)), torch.sigmoid(torch.tensor(6.0 / w.scale))
    u = ((cdf - lo) / (hi - lo)).double()
    k = torch.arange(50, dtype=torch.float64)
    assert bool((u >= k / 50 - 1e-5).all()) and bool((u <= (k + 1) / 50 + 1e-5).all())
    # the weight is 1 / (2 q) of the truncated logistic proposal
    z = lam / w.scale
    q = torch.sigmoid(z) * torch.sigmoid(-z) / w.scale / (hi - lo)
    assert torch.allclose(a.weight.double(), 0.5 / q, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "flow"])
def test_elbo_plan_integrates_half_the_integrand_over_lambda(kind: str) -> None:
    """mean(weight * f(lambda)) estimates 1/2 * integral of f over the schedule's lambda range."""
    sched = ScheduleOnly(kind)
    plan = ELBOWeighting("flow").plan(sched, torch.zeros(400), torch.Generator().manual_seed(0))
    lam = sched.log_snr(plan.t)
    assert torch.isfinite(lam).all() and torch.isfinite(plan.weight).all()
    f = torch.exp(-lam.pow(2) / 8)  # integral over the real line: sqrt(8 pi)
    estimate = float((plan.weight.double() * f).mean())
    # both ranges cover where f lives ([-6, 6] drops 0.3 % of the mass)
    exact = 0.5 * math.sqrt(8 * math.pi) * (math.erf(6 / math.sqrt(8)) if kind == "linear" else 1.0)
    assert estimate == pytest.approx(exact, rel=2e-3)


def test_non_monotone_log_snr_is_a_numerical_error() -> None:
    with pytest.raises(NumericalError, match="not strictly decreasing"):
        ELBOWeighting("epsilon").plan(ScheduleOnly("broken"), torch.zeros(4), torch.Generator())


@pytest.mark.parametrize(("loc", "scale"), [(0.0, 0.0), (float("nan"), 1.0), (0.0, -1.0)])
def test_bad_proposal_parameters(loc: float, scale: float) -> None:
    with pytest.raises(ConfigError, match="logistic proposal"):
        ELBOWeighting("epsilon", loc=loc, scale=scale)
