"""The flow ELBO with FLUX.1's dynamic shift, validated against exact Gaussian log-likelihoods.

The analytic backbone below has the data law ``x ~ N(mu_c, s^2 I)`` per class and the EXACT
posterior-mean velocity as its denoiser, on the noise table of a :class:`FlowShiftSchedule` --
the very object :class:`~t2ialign_flux.flux.FluxBackbone` uses. For such a model the
continuous-time ELBO is tight, so t2ialign's ``flow/elbo`` weighting must recover
``log N(x; mu_i, s^2 I) - log N(x; mu_j, s^2 I)`` within Monte-Carlo error, whatever the shift.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from t2ialign.core.elbo import estimate_class_losses
from t2ialign.core.host import Host
from t2ialign.core.protocols import LayerInfo, TextCond
from t2ialign.core.timesteps import parse_timesteps
from t2ialign.plugins.weightings import ELBOWeighting
from t2ialign_flux.schedule import FlowShiftSchedule
from tiny_flux import FLUX_SCHEDULER

D = 64
S = 0.6


class GaussianFlowBackbone:
    """Exact flow denoiser of ``N(mu_c, s^2 I)`` data on the noise table of ``schedule``.

    ``model_schedule``: the table the *denoiser* assumes (default: the same); a different one
    models a backbone whose noising and model disagree (the test's negative control).
    """

    prediction_type = "flow"
    attention_kind = "none"
    device = torch.device("cpu")
    dtype = torch.float32
    image_size = 16
    max_tokens = 1
    denoiser = torch.nn.Identity()

    def __init__(self, schedule: FlowShiftSchedule, means: torch.Tensor, s: float,
                 model_schedule: FlowShiftSchedule | None = None):
        self.name = f"gaussian-flow-shift{schedule.shift:.3f}"
        self.schedule = schedule
        self.model_schedule = model_schedule or schedule
        self.num_train_timesteps = schedule.num_train_timesteps
        self.means = means.double()
        self.s = s

    def alpha_sigma(self, t):
        return self.schedule.alpha_sigma(t)

    def log_snr(self, t):
        return self.schedule.log_snr(t)

    def add_noise(self, z0, t, noise):
        sigma = self.schedule.sigma(t).reshape((-1,) + (1,) * (z0.dim() - 1))
        return ((1 - sigma) * z0.double() + sigma * noise.double()).float()

    def predict(self, z_t, t, cond):
        b = z_t.shape[0]
        sigma = self.model_schedule.sigma(t).reshape(b, 1)
        alpha = 1 - sigma
        z = z_t.double().reshape(b, -1)
        mu = cond.embeds[:, 0, :].double()
        var = alpha ** 2 * self.s ** 2 + sigma ** 2
        resid = z - alpha * mu
        eps_hat = sigma * resid / var
        x_hat = mu + alpha * self.s ** 2 * resid / var
        return (eps_hat - x_hat).float().reshape(z_t.shape)

    def encode_text(self, prompts):
        return TextCond(embeds=self.means[[int(p[1:]) for p in prompts]].float()[:, None, :])

    def encode_image(self, images):
        raise NotImplementedError

    def token_spans(self, prompt, phrase):
        return [0]

    def attention_layers(self) -> list[LayerInfo]:
        return []

    def log_lik_diff(self, x: torch.Tensor, i: int, j: int) -> float:
        x = x.double().reshape(-1)
        return float(((x - self.means[j]).pow(2).sum() - (x - self.means[i]).pow(2).sum()) / (2 * self.s ** 2))

    def kept_fraction(self) -> float:
        """Share of the ELBO integral inside the schedule's finite log-SNR range (the rest is not estimated)."""
        lam = self.log_snr(torch.linspace(0, self.num_train_timesteps - 1, 8 * (self.num_train_timesteps - 1) + 1))
        lam = lam[torch.isfinite(lam)].double()
        lo, hi = float(lam.min()), float(lam.max())
        return 1 / (1 + math.exp(lo) * S ** 2) - 1 / (1 + math.exp(hi) * S ** 2)


def _problem(schedule: FlowShiftSchedule, model_schedule: FlowShiftSchedule | None = None, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    means = 0.35 * torch.randn(3, D, generator=gen, dtype=torch.float64)
    backbone = GaussianFlowBackbone(schedule, means, S, model_schedule)
    x = (means[0] + S * torch.randn(D, generator=gen, dtype=torch.float64)).float().reshape(1, 4, 4, 4)
    return backbone, x, backbone.encode_text(["c0", "c1", "c2"])


def _estimate(backbone, x, cond, n=1000, seed=0):
    grid = parse_timesteps([["random", 0, 999, n]], seed=seed)
    return estimate_class_losses(backbone, ELBOWeighting("flow"), x, cond, grid, batch_size=256, seed=seed)


@pytest.fixture(scope="module")
def tiny_dev_schedule(flux_folders, tmp_path_factory) -> FlowShiftSchedule:
    """The schedule of the tiny FLUX.1-dev model, loaded through the Host like any backbone."""
    reg = tmp_path_factory.mktemp("reg") / "r.yaml"
    reg.write_text(json.dumps({"backbones": {"d": {"plugin": "flux", "model": str(flux_folders["dev"]),
                                                   "t5_max_length": 8}}}))
    backbone = Host(registry_files=[reg]).backbone("d")
    assert backbone.schedule.mu is not None  # the dynamic shift is in use
    return backbone.schedule


@pytest.mark.parametrize("which", ["tiny-backbone", "flux-1024px"])
def test_flow_elbo_recovers_exact_log_likelihood_with_dynamic_shift(which, tiny_dev_schedule):
    schedule = (tiny_dev_schedule if which == "tiny-backbone"
                else FlowShiftSchedule.from_scheduler_config(FLUX_SCHEDULER, 64 * 64))
    backbone, x, cond = _problem(schedule)
    res = _estimate(backbone, x, cond)
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        exact = backbone.log_lik_diff(x, i, j)
        est = res.log_likelihood_diff(i, j)
        se = float(res.diff_se[i, j])
        print(f"[{which} shift {schedule.shift:.4f} mu {schedule.mu:.4f}] ({i},{j}) exact {exact:.4f} "
              f"estimate {est:.4f} |error| {abs(est - exact):.4f} se {se:.4f}")
        # the part of the integral outside the table's log-SNR range is negligible here
        assert abs(exact) * (1 - backbone.kept_fraction()) < 0.25 * se
        assert abs(est - exact) < 3 * se
        assert 3 * se < 0.5 * abs(exact)  # teeth: a factor-2 slip would be caught


def test_a_schedule_mismatch_is_detected():
    """Negative control: noising with FLUX.1's dynamic table at 256 image tokens (512 px, shift
    e^0.5 = 1.65) while the denoiser assumes the static ``shift: 3.0`` of the same config file (what
    ignoring ``use_dynamic_shifting`` amounts to) is off by far more than 3 standard errors -- so
    the test above can fail."""
    dynamic = FlowShiftSchedule.from_scheduler_config(FLUX_SCHEDULER, 256)
    static = FlowShiftSchedule(shift=FLUX_SCHEDULER["shift"])
    backbone, x, cond = _problem(dynamic, model_schedule=static)
    res = _estimate(backbone, x, cond)
    worst = max(abs(res.log_likelihood_diff(i, j) - backbone.log_lik_diff(x, i, j)) / float(res.diff_se[i, j])
                for i, j in [(0, 1), (0, 2), (1, 2)])
    print(f"mismatched schedule: worst error {worst:.1f} standard errors")
    assert worst > 3
