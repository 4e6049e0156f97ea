"""The stable_diffusion backbone plugin on a tiny random SD pipeline saved in the diffusers layout."""

from __future__ import annotations

import shutil

import pytest
import torch

from t2ialign.core.errors import ConfigError, InputError, ModelLoadError
from t2ialign.core.host import Host
from t2ialign.core.protocols import Backbone
from t2ialign.plugins.backbones.common import images_to_tensor, resolve_model_path, torch_dtype
from t2ialign.plugins.backbones.stable_diffusion import unet_attention_layers
from tests.helpers.tiny_models import IMAGE, LATENT, cached_tiny_sd, write_registry


def _load(tmp_path, name="tiny", **options):
    options.setdefault("model", str(cached_tiny_sd()))
    reg = write_registry(tmp_path / "reg.yaml", name, "stable_diffusion", **options)
    return Host(registry_files=[reg]).backbone(name)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return _load(tmp_path_factory.mktemp("sd"))


def test_loads_through_the_registry(sd):
    assert isinstance(sd, Backbone)
    assert sd.prediction_type == "epsilon"
    assert sd.attention_kind == "unet" and sd.denoiser is sd.unet
    assert sd.image_size == IMAGE and sd.latent_size == LATENT
    assert sd.max_tokens == 77 and sd.num_train_timesteps == 1000
    assert sd.layer_defaults["cross_weight"] == [1, 1, 10, 15, 10, 1, 1]
    assert sd.scheduler_config["beta_schedule"] == "scaled_linear"


def test_schedule_matches_diffusers_alphas_cumprod(sd):
    from diffusers import DDIMScheduler

    acp = DDIMScheduler.from_config(sd.scheduler_config).alphas_cumprod
    t = torch.tensor([0.0, 1.0, 20.0, 200.0, 999.0])
    alpha, sigma = sd.alpha_sigma(t)
    assert torch.allclose(alpha, acp[t.long()].sqrt(), atol=1e-6)
    assert torch.allclose(sigma, (1 - acp[t.long()]).sqrt(), atol=1e-6)
    # method-spec §6.2: SD1.5 schedule at t=20 and t=200
    assert alpha[2].item() == pytest.approx(0.991, abs=1e-3) and sigma[2].item() == pytest.approx(0.137, abs=1e-3)
    assert alpha[3].item() == pytest.approx(0.868, abs=1e-3) and sigma[3].item() == pytest.approx(0.496, abs=1e-3)


def test_fractional_timesteps_interpolate_log_snr(sd):
    lam = sd.log_snr(torch.tensor([10.0, 11.0, 10.25]))
    assert lam[2].item() == pytest.approx((0.75 * lam[0] + 0.25 * lam[1]).item(), rel=1e-6)
    assert (torch.diff(sd.log_snr(torch.linspace(0, 999, 50))) < 0).all()
    a, s = sd.alpha_sigma(torch.tensor([10.25]))
    assert (a ** 2 + s ** 2).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(InputError, match=r"\[0, 999\]"):
        sd.log_snr(torch.tensor([1000.0]))


def test_add_noise_per_row(sd):
    z0, noise = torch.randn(2, 4, LATENT, LATENT), torch.randn(2, 4, LATENT, LATENT)
    t = torch.tensor([5.0, 700.0])
    zt = sd.add_noise(z0, t, noise)
    a, s = sd.alpha_sigma(t)
    assert torch.allclose(zt[1], a[1] * z0[1] + s[1] * noise[1], atol=1e-6)


def test_encode_image_is_scaled_posterior_mean(sd):
    images = torch.rand(2, 3, 40, 24)  # non-square: squashed to the square working size
    z = sd.encode_image(images)
    assert z.shape == (2, 4, LATENT, LATENT) and z.dtype == torch.float32
    x = images_to_tensor(images, IMAGE)
    assert x.shape == (2, 3, IMAGE, IMAGE) and x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        mean = sd.vae.encode(x).latent_dist.mean
    assert torch.allclose(z, mean * sd.vae.config.scaling_factor, atol=1e-5)
    # deterministic: the mean, not a sample
    assert torch.equal(z, sd.encode_image(images))
    # uint8 H x W x 3 arrays are accepted too
    arr = (images[0].permute(1, 2, 0).numpy() * 255).astype("uint8")
    assert sd.encode_image(arr).shape == (1, 4, LATENT, LATENT)


def test_decode_latents_range(sd):
    out = sd.decode_latents(torch.randn(1, 4, LATENT, LATENT))
    assert out.shape == (1, 3, IMAGE, IMAGE) and out.min() >= 0 and out.max() <= 1


def test_encode_text_is_last_hidden_state_padded_to_77(sd):
    cond = sd.encode_text(["a photo of cat", "a photo of dog, tree"])
    assert cond.embeds.shape == (2, 77, 16) and cond.pooled is None
    ids = sd.tokenizer(["a photo of cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = sd.text_encoder(ids).last_hidden_state
    assert torch.allclose(cond.embeds[:1], ref, atol=1e-6)


def test_predict_matches_a_direct_unet_call(sd):
    torch.manual_seed(0)
    z0 = torch.randn(3, 4, LATENT, LATENT)
    noise = torch.randn_like(z0)
    cond = sd.encode_text(["a photo of cat"]).select([0, 0, 0])
    # ELBO-style: the same latent at several timesteps, one batch
    t = torch.tensor([1.0, 251.0, 951.0])
    zt = sd.add_noise(z0, t, noise)
    pred = sd.predict(zt, t, cond)
    assert pred.shape == z0.shape and pred.dtype == torch.float32 and torch.isfinite(pred).all()
    with torch.no_grad():
        ref = sd.unet(zt, t, encoder_hidden_states=cond.embeds).sample
    assert torch.allclose(pred, ref, atol=1e-5)
    losses = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    assert losses.shape == (3,) and (losses > 0).all()
    with pytest.raises(InputError, match="text conditions"):
        sd.predict(zt, t, cond.select([0]))


def test_prediction_type_from_config_and_override(tmp_path):
    v = _load(tmp_path, model=str(cached_tiny_sd("v_prediction")))
    assert v.prediction_type == "v_prediction"
    forced = _load(tmp_path, model=str(cached_tiny_sd("v_prediction")), prediction="epsilon")
    assert forced.prediction_type == "epsilon"
    with pytest.raises(ConfigError, match="not supported"):
        _load(tmp_path, prediction="sample")


def test_image_size_option(tmp_path):
    b = _load(tmp_path, image_size=64)
    assert b.image_size == 64 and b.latent_size == 32
    assert b.encode_image(torch.rand(1, 3, 32, 32)).shape == (1, 4, 32, 32)
    assert {l.grid for l in b.attention_layers()} == {(32, 32), (16, 16), (8, 8)}
    with pytest.raises(ConfigError, match="multiple"):
        _load(tmp_path, image_size=33)


def test_layers_in_forward_order_with_grids_and_groups(sd):
    layers = sd.attention_layers()
    assert len(layers) == 14
    cross = [l for l in layers if l.kind == "cross"]
    assert [l.grid[0] for l in cross] == [16, 8, 4, 8, 8, 16, 16]
    assert [l.group for l in cross] == [0, 1, 2, 3, 3, 4, 4]
    assert [l.place for l in cross] == ["down", "down", "mid", "up", "up", "up", "up"]
    assert [l.depth for l in cross] == list(range(7))
    # verify against the real forward: record processor call order and query counts
    from diffusers.models.attention_processor import AttnProcessor2_0

    calls = []

    class Recorder(AttnProcessor2_0):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def __call__(self, attn, hidden_states, *args, **kwargs):
            calls.append((self.name, hidden_states.shape[1]))
            return super().__call__(attn, hidden_states, *args, **kwargs)

    modules = dict(sd.unet.named_modules())
    originals = {l.name: modules[l.name].processor for l in layers}
    try:
        for l in layers:
            modules[l.name].set_processor(Recorder(l.name))
        cond = sd.encode_text(["a photo of cat"])
        sd.predict(torch.randn(1, 4, LATENT, LATENT), torch.tensor([10.0]), cond)
    finally:
        for name, proc in originals.items():
            modules[name].set_processor(proc)
    assert [c[0] for c in calls] == [l.name for l in layers]
    assert [c[1] for c in calls] == [l.grid[0] * l.grid[1] for l in layers]


def test_full_size_sd15_layout_on_meta_device():
    from diffusers import UNet2DConditionModel

    config = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                  block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    layers = unet_attention_layers(unet, (64, 64))
    cross = [l for l in layers if l.kind == "cross"]
    assert len(cross) == 16 and len(layers) == 32
    assert [l.grid[0] for l in cross] == [64, 64, 32, 32, 16, 16, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]
    assert max(l.group for l in cross) + 1 == 7  # the reference's 7 cross_weight groups


def test_missing_tokenizer_falls_back_to_the_offline_clip_tokenizer(tmp_path):
    folder = tmp_path / "no_tok"
    shutil.copytree(cached_tiny_sd(), folder)
    shutil.rmtree(folder / "tokenizer")
    b = _load(tmp_path, model=str(folder))
    assert b.tokenizer("a photo of cat").input_ids == [49406, 320, 1125, 539, 2368, 49407]
    assert b.token_spans("a photo of cat, dog", "dog") == [6]


def test_hub_id_offline_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        _load(tmp_path, model="someone/not-downloaded-model")
    msg = str(info.value)
    assert "someone/not-downloaded-model" in msg
    assert "hf download someone/not-downloaded-model --local-dir DIR" in msg
    assert "--registry" in msg


def test_bad_model_values(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        _load(tmp_path, model=str(tmp_path / "missing_folder"))
    with pytest.raises(ModelLoadError, match="empty"):
        resolve_model_path("", offline=True)
    with pytest.raises(ModelLoadError, match="train-toy"):
        resolve_model_path("builtin:no_such_model", offline=True)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(cached_tiny_sd(), incomplete)
    shutil.rmtree(incomplete / "unet")
    with pytest.raises(ModelLoadError, match="no folder 'unet'"):
        _load(tmp_path, model=str(incomplete))


def test_torch_dtype_names():
    assert torch_dtype("fp16") is torch.float16 and torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype"):
        torch_dtype("float8")


def test_unknown_registry_option_is_rejected(tmp_path):
    from t2ialign.core.errors import RegistryError

    reg = write_registry(tmp_path / "bad.yaml", "tiny", "stable_diffusion", model="x", cross_weights=[1])
    with pytest.raises(RegistryError, match="cross_weight"):
        Host(registry_files=[reg])
