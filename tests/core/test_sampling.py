"""The model-agnostic sampler: DDIM/Euler steps against diffusers' schedulers, and seeded tiny-SD samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2ialign.core import sampling
from t2ialign.core.errors import ConfigError, InputError
from t2ialign.core.host import Host
from t2ialign.core.protocols import TextCond
from tests.helpers.tiny_models import IMAGE, LATENT, cached_tiny_sd, write_registry


def _backbone(tmp_path, prediction_type="epsilon"):
    reg = write_registry(tmp_path / "reg.yaml", "tiny", "stable_diffusion", model=str(cached_tiny_sd(prediction_type)))
    return Host(registry_files=[reg]).backbone("tiny")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return _backbone(tmp_path_factory.mktemp("sd"))


def test_reference_schedule_of_50_steps(sd):
    ts = sampling.ddim_timesteps(sd, 50)
    assert ts[:3] == [999, 979, 959] and ts[-1] == 19 and len(ts) == 50
    pairs = sampling.step_pairs(ts)
    assert pairs[0] == (999, 979) and pairs[-1] == (19, 0)
    assert all(t - p == 20 for t, p in pairs[:-1])


def test_schedule_generalises_to_any_step_count(sd):
    from diffusers import DDIMScheduler

    for steps in (1, 7, 25, 1000):
        sched = DDIMScheduler.from_config(sd.scheduler_config, timestep_spacing="trailing")
        sched.set_timesteps(steps)
        assert sampling.ddim_timesteps(sd, steps) == sched.timesteps.tolist()
    for bad in (0, 1001, 2.5, True):
        with pytest.raises(ConfigError, match="sampling steps"):
            sampling.ddim_timesteps(sd, bad)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_equals_diffusers_ddim_scheduler(tmp_path, prediction_type):
    from diffusers import DDIMScheduler

    bb = _backbone(tmp_path, prediction_type)
    sched = DDIMScheduler.from_config(bb.scheduler_config, timestep_spacing="trailing")
    assert sched.config.prediction_type == prediction_type and not sched.config.set_alpha_to_one
    sched.set_timesteps(50)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, LATENT, LATENT, generator=gen)
    pred = torch.randn(2, 4, LATENT, LATENT, generator=gen)
    # first, a middle and the last step (which lands on alpha_bar_0 in both implementations)
    for t, t_prev in [(999, 979), (499, 479), (19, 0)]:
        ours = sampling.ddim_step(bb, z, pred, t, t_prev)
        ref = sched.step(pred, t, z, eta=0.0).prev_sample
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_flow_step_is_the_rectified_flow_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    class FlowSchedule:  # the minimum of the Backbone protocol the step reads
        name = "flow-toy"
        prediction_type = "flow"
        num_train_timesteps = 1000

        def alpha_sigma(self, t):
            sigma = (torch.as_tensor(t, dtype=torch.float64) + 1) / 1000
            return (1 - sigma).float(), sigma.float()

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(sigmas=[1.0, 0.5], device="cpu")  # appends the terminal sigma 0
    z = torch.randn(1, 4, 8, 8)
    v = torch.randn(1, 4, 8, 8)
    ref = sched.step(v, sched.timesteps[0], z).prev_sample
    # index 999 has sigma 1, index 499 sigma 0.5
    ours = sampling.ddim_step(FlowSchedule(), z, v, 999, 499)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # it moves along the straight line between x0 and eps: endpoint check
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    z_top = eps  # sigma = 1 at index 999
    z_mid = sampling.ddim_step(FlowSchedule(), z_top, eps - x0, 999, 499)
    torch.testing.assert_close(z_mid, 0.5 * x0 + 0.5 * eps, rtol=1e-5, atol=1e-5)


def test_cfg_formula():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert sampling.cfg(c, u, 7.5).item() == pytest.approx(1.0 + 7.5 * 1.0)
    assert sampling.cfg(c, u, 1.0).item() == pytest.approx(2.0)


def test_encode_prompts_uses_the_empty_prompt_as_unconditional(sd):
    cond, uncond = sampling.encode_prompts(sd, ["a red star", "a blue circle"])
    assert cond.embeds.shape[0] == 2 and uncond.embeds.shape == cond.embeds.shape
    torch.testing.assert_close(uncond.embeds[0], sd.encode_text([""]).embeds[0])
    torch.testing.assert_close(uncond.embeds[0], uncond.embeds[1])
    with pytest.raises(InputError):
        sampling.encode_prompts(sd, [])


def test_tiny_sd_sample_is_deterministic_per_seed(sd):
    img_a, lat_a = sampling.sample(sd, "a red star", steps=3, guidance=7.5, seed=11)
    img_b, lat_b = sampling.sample(sd, "a red star", steps=3, guidance=7.5, seed=11)
    img_c, _ = sampling.sample(sd, "a red star", steps=3, guidance=7.5, seed=12)
    assert img_a.shape == (IMAGE, IMAGE, 3) and img_a.dtype == np.uint8
    assert lat_a.shape == (1, 4, LATENT, LATENT)
    assert np.array_equal(img_a, img_b) and torch.equal(lat_a, lat_b)
    assert not torch.equal(lat_a, sampling.sample(sd, "a red star", steps=3, seed=12)[1])
    assert img_c.shape == img_a.shape


def test_sample_hooks_see_every_step_and_can_replace_the_condition(sd):
    seen, conds = [], []
    cond_blue = sd.encode_text(["a blue circle"])

    def cond_fn(step, t, z_t):
        conds.append((step, t))
        return cond_blue

    def callback(step, t, z):
        seen.append((step, t, tuple(z.shape)))

    _, lat = sampling.sample(sd, "a red star", steps=4, guidance=2.0, seed=5, cond_fn=cond_fn, step_callback=callback)
    ts = sampling.ddim_timesteps(sd, 4)
    assert conds == list(enumerate(ts)) and [s[:2] for s in seen] == list(enumerate(ts))
    # replacing the condition by another prompt's encoding every step = sampling that prompt
    _, lat_blue = sampling.sample(sd, "a blue circle", steps=4, guidance=2.0, seed=5)
    torch.testing.assert_close(lat, lat_blue)
    # a batch of prompts shares one initial noise, row i equals the single-prompt sample
    imgs, lat_b = sampling.sample(sd, ["a red star", "a blue circle"], steps=4, guidance=2.0, seed=5)
    assert imgs.shape == (2, IMAGE, IMAGE, 3)
    torch.testing.assert_close(lat_b[1:], lat_blue, rtol=1e-4, atol=1e-5)


def test_step_by_hand_matches_sample(sd):
    """sample() = encode, noise from the seed, CFG on one batched call, ddim_step -- nothing hidden."""
    cond, uncond = sampling.encode_prompts(sd, "a red star")
    z = sampling.initial_noise((1, 4, LATENT, LATENT), 9)
    for t, t_prev in sampling.step_pairs(sampling.ddim_timesteps(sd, 2)):
        e_c = sd.predict(z, torch.tensor([float(t)]), cond)
        e_u = sd.predict(z, torch.tensor([float(t)]), uncond)
        z = sampling.ddim_step(sd, z, sampling.cfg(e_c, e_u, 3.0), t, t_prev)
    _, lat = sampling.sample(sd, "a red star", steps=2, guidance=3.0, seed=9)
    # sample() runs cond and uncond as ONE batch of 2, the hand loop as two batches of 1: CPU kernels
    # block a batch differently, so float32 results differ by ~1e-5 after guidance 3 amplifies them
    # (seen 1.9e-5 on an AMD EPYC); a wrong step, guidance or noise would be off by ~0.1
    torch.testing.assert_close(lat, z, rtol=1e-4, atol=1e-4)


def test_backbone_without_decoder_is_refused(sd):
    class NoDecoder:
        name = "nodec"

    with pytest.raises(InputError, match="decode"):
        sampling.sample(NoDecoder(), "a red star", seed=0)
    assert isinstance(sampling.encode_prompts(sd, "x")[0], TextCond)
