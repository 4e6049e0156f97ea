"""The flow schedule with dynamic shift equals what diffusers' FLUX pipeline and scheduler compute."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from t2ialign.core.errors import ConfigError, InputError
from t2ialign_flux.schedule import FlowShiftSchedule, dynamic_shift_mu
from tiny_flux import FLUX_SCHEDULER


def _diffusers_table(config: dict, image_seq_len: int) -> tuple[torch.Tensor, float]:
    """sigmas FluxPipeline sets for a 1000-step run, flipped to increasing noise, and its mu."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(**config)
    n = sched.config.num_train_timesteps
    mu = calculate_shift(image_seq_len, sched.config.base_image_seq_len, sched.config.max_image_seq_len,
                         sched.config.base_shift, sched.config.max_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    return sched.sigmas[:n].flip(0), mu


@pytest.mark.parametrize("image_seq_len", [16, 64, 256, 1024, 4096])
def test_dynamic_shift_table_equals_flux_pipeline_sigmas(image_seq_len):
    expected, mu = _diffusers_table(FLUX_SCHEDULER, image_seq_len)
    schedule = FlowShiftSchedule.from_scheduler_config(FLUX_SCHEDULER, image_seq_len)
    assert schedule.mu == pytest.approx(mu, abs=1e-12)
    assert schedule.shift == pytest.approx(math.exp(mu), rel=1e-12)
    _, sigma = schedule.alpha_sigma(torch.arange(1000, dtype=torch.float32))
    torch.testing.assert_close(sigma, expected, atol=2e-6, rtol=0)


def test_mu_is_the_line_through_base_and_max():
    assert dynamic_shift_mu(256, FLUX_SCHEDULER) == pytest.approx(0.5)
    assert dynamic_shift_mu(4096, FLUX_SCHEDULER) == pytest.approx(1.15)
    assert dynamic_shift_mu(2176, FLUX_SCHEDULER) == pytest.approx(0.825)
    # 1024 px FLUX.1: 64x64 packed tokens -> shift e^1.15 = 3.16, a much noisier table than at 256 tokens
    hi = FlowShiftSchedule.from_scheduler_config(FLUX_SCHEDULER, 4096)
    lo = FlowShiftSchedule.from_scheduler_config(FLUX_SCHEDULER, 256)
    t = torch.tensor([100.0, 500.0])
    assert (hi.sigma(t) > lo.sigma(t)).all()


def test_linear_time_shift_and_static_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    linear = {**FLUX_SCHEDULER, "time_shift_type": "linear"}
    expected, mu = _diffusers_table(linear, 1024)
    schedule = FlowShiftSchedule.from_scheduler_config(linear, 1024)
    assert schedule.shift == pytest.approx(mu)
    torch.testing.assert_close(schedule.alpha_sigma(torch.arange(1000.0))[1], expected, atol=2e-6, rtol=0)
    static = FlowShiftSchedule.from_scheduler_config({"shift": 3.0, "num_train_timesteps": 1000}, 4096)
    assert static.mu is None and static.shift == 3.0
    table = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas[:1000].flip(0)
    torch.testing.assert_close(static.alpha_sigma(torch.arange(1000.0))[1], table, atol=1e-6, rtol=0)


def test_log_snr_is_decreasing_and_alpha_is_one_minus_sigma():
    schedule = FlowShiftSchedule.from_scheduler_config(FLUX_SCHEDULER, 4096)
    t = torch.linspace(0, 998, 500)
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(alpha, 1 - sigma)
    lam = schedule.log_snr(t)
    torch.testing.assert_close(lam, 2 * torch.log(alpha / sigma), atol=1e-4, rtol=1e-5)
    assert (lam[1:] < lam[:-1]).all()
    assert schedule.log_snr(torch.tensor(999.0)) == -math.inf


@pytest.mark.parametrize("bad", [-1.0, 1000.0, float("nan")])
def test_out_of_range_timesteps(bad):
    with pytest.raises(InputError, match="timestep index out of range"):
        FlowShiftSchedule(shift=2.0).sigma(torch.tensor([bad]))


@pytest.mark.parametrize("option", ["shift_terminal", "use_karras_sigmas", "invert_sigmas"])
def test_table_bending_options_are_refused(option):
    value = 0.02 if option == "shift_terminal" else True
    with pytest.raises(ConfigError, match=option):
        FlowShiftSchedule.from_scheduler_config({**FLUX_SCHEDULER, option: value}, 4096)
