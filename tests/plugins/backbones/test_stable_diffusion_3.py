"""Tests of the SD3 / SD3.5 backbone plugin on tiny random pipelines saved in the diffusers layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from t2ialign.core.errors import ConfigError, InputError, ModelLoadError
from t2ialign.core.host import Host
from t2ialign.core.protocols import Backbone
from t2ialign.plugins.backbones.stable_diffusion_3 import StableDiffusion3Backbone
from tests.helpers.tiny_sd3 import IMAGE_SIZE, LATENT_CHANNELS, LATENT_SIZE, PATCH, T5_WIDTH, make_tiny_sd3

T5_LEN = 16  # short T5 axis keeps the tiny tests fast; the default (256) is checked on its own


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd3")
    return {
        "sd35": make_tiny_sd3(root / "sd35", with_t5=False, dual_attention=True),
        "sd35_t5": make_tiny_sd3(root / "sd35_t5", with_t5=True, dual_attention=True),
        "sd3": make_tiny_sd3(root / "sd3", with_t5=False, dual_attention=False),
    }


def make_host(tmp_path: Path, **entries: dict) -> Host:
    body = {"backbones": {name: {"plugin": "stable_diffusion_3", **opts} for name, opts in entries.items()}}
    reg = tmp_path / "registry.yaml"
    reg.write_text(json.dumps(body))  # JSON is valid YAML
    return Host(registry_files=[reg])


@pytest.fixture(scope="module")
def host_and_backbones(folders, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reg")
    host = make_host(
        tmp,
        tiny=dict(model=str(folders["sd35"]), t5_max_length=T5_LEN),
        tiny_t5=dict(model=str(folders["sd35_t5"]), t5_max_length=T5_LEN),
    )
    return host, host.backbone("tiny"), host.backbone("tiny_t5")


@pytest.fixture(scope="module")
def bb(host_and_backbones) -> StableDiffusion3Backbone:
    return host_and_backbones[1]


@pytest.fixture(scope="module")
def bb_t5(host_and_backbones) -> StableDiffusion3Backbone:
    return host_and_backbones[2]


# ------------------------------------------------------------------------------------ loading
def test_loads_through_registry_with_the_real_classes(bb, bb_t5):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    assert isinstance(bb, Backbone)
    assert bb.prediction_type == "flow" and bb.attention_kind == "mmdit"
    assert isinstance(bb.denoiser, SD3Transformer2DModel) and isinstance(bb.vae, AutoencoderKL)
    assert isinstance(bb.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(bb.text_encoder_2, CLIPTextModelWithProjection)
    assert bb.text_encoder_3 is None and isinstance(bb_t5.text_encoder_3, T5EncoderModel)
    assert bb.image_size == IMAGE_SIZE  # the VAE's sample_size
    assert bb.grid == (LATENT_SIZE // PATCH,) * 2
    assert bb.max_tokens == 77 + T5_LEN
    assert bb.shift == 3.0 and bb.num_train_timesteps == 1000
    assert bb.tokenizer_2.pad_token == "!" and bb.tokenizer.pad_token == "<|endoftext|>"
    assert bb.layer_defaults == {"cross_weight": [1.0], "cross_gaussian_sigma": 3.0, "self_weight": [[1.0], [1.0]]}


def test_default_t5_length_sets_the_joint_axis(folders, tmp_path):
    bb = make_host(tmp_path, d=dict(model=str(folders["sd35"]))).backbone("d")
    assert bb.max_tokens == 77 + 256
    assert bb.encode_text(["a photo of cat"]).embeds.shape == (1, 333, T5_WIDTH)


def test_attention_layers_sd35_and_sd3(bb, folders, tmp_path):
    layers = bb.attention_layers()
    assert [(l.name, l.kind, l.depth) for l in layers] == [
        ("transformer_blocks.0.attn", "joint", 0),
        ("transformer_blocks.0.attn2", "self", 0),
        ("transformer_blocks.1.attn", "joint", 1),
    ]
    assert {(l.grid, l.group, l.place) for l in layers} == {((8, 8), 0, "block")}
    from diffusers.models.attention_processor import Attention

    assert all(isinstance(bb.denoiser.get_submodule(l.name), Attention) for l in layers)
    sd3 = make_host(tmp_path, s=dict(model=str(folders["sd3"]))).backbone("s")
    assert [(l.name, l.kind) for l in sd3.attention_layers()] == [
        ("transformer_blocks.0.attn", "joint"),
        ("transformer_blocks.1.attn", "joint"),
    ]


# ------------------------------------------------------------------------------------ noise schedule
def test_sigma_table_matches_diffusers_scheduler(bb):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    t = torch.arange(1000, dtype=torch.float32)
    alpha, sigma = bb.alpha_sigma(t)
    # diffusers' table runs from pure noise down; index t counts up from the clean end
    torch.testing.assert_close(sigma, sched.sigmas[:1000].flip(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(bb.model_timestep(t), sched.timesteps.flip(0), atol=1e-3, rtol=0)
    torch.testing.assert_close(alpha, 1 - sigma)
    # values the method spec lists for shift 3
    for idx, expected in ((1, 0.006), (20, 0.061), (200, 0.430), (951, 0.984)):
        assert abs(bb.alpha_sigma(torch.tensor(float(idx)))[1].item() - expected) < 1e-3


def test_log_snr_is_the_flow_log_snr_and_decreasing(bb):
    t = torch.linspace(0, 998, 400)
    alpha, sigma = bb.alpha_sigma(t)
    lam = bb.log_snr(t)
    torch.testing.assert_close(lam, 2 * torch.log(alpha / sigma), atol=1e-4, rtol=1e-5)
    assert (lam[1:] < lam[:-1]).all()
    # fractional indices interpolate between the integer entries
    mid = bb.alpha_sigma(torch.tensor(20.5))[1]
    assert bb.alpha_sigma(torch.tensor(20.0))[1] < mid < bb.alpha_sigma(torch.tensor(21.0))[1]


@pytest.mark.parametrize("bad", [-1.0, 1000.0, float("nan")])
def test_timestep_out_of_range_is_an_input_error(bb, bad):
    with pytest.raises(InputError, match="timestep index out of range"):
        bb.alpha_sigma(torch.tensor([bad]))


def test_add_noise_per_row(bb):
    z0 = torch.randn(3, LATENT_CHANNELS, 4, 4)
    eps = torch.randn_like(z0)
    t = torch.tensor([1.0, 200.0, 951.0])
    z_t = bb.add_noise(z0, t, eps)
    for i in range(3):
        a, s = bb.alpha_sigma(t[i])
        torch.testing.assert_close(z_t[i], a * z0[i] + s * eps[i])
    with pytest.raises(InputError, match="2 timesteps for a batch of 3"):
        bb.add_noise(z0, t[:2], eps)


# ------------------------------------------------------------------------------------ encoders
def _pipeline(folder: Path):
    from diffusers import StableDiffusion3Pipeline

    index = json.loads((folder / "model_index.json").read_text())
    if index["text_encoder_3"][1] is None:  # diffusers wants the absent T5 named explicitly
        return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    return StableDiffusion3Pipeline.from_pretrained(folder)


@pytest.mark.parametrize("which", ["tiny", "tiny_t5"])
def test_encode_text_equals_diffusers_encode_prompt(host_and_backbones, folders, which):
    _, bb, bb_t5 = host_and_backbones
    backbone = bb if which == "tiny" else bb_t5
    pipe = _pipeline(folders["sd35" if which == "tiny" else "sd35_t5"])
    prompts = ["a photo of cat, dog", "a photo of a red bus"]
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=T5_LEN)
    cond = backbone.encode_text(prompts)
    assert cond.embeds.shape == (2, 77 + T5_LEN, T5_WIDTH)
    torch.testing.assert_close(cond.embeds, embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.pooled, pooled, atol=1e-5, rtol=1e-5)
    t5_part = cond.embeds[:, 77:]
    if which == "tiny":
        assert t5_part.abs().max() == 0  # no T5: zeros, as diffusers does
    else:
        assert t5_part.abs().amax(dim=(1, 2)).min() > 0


def test_use_t5_false_replaces_t5_by_zeros(folders, tmp_path):
    bb = make_host(tmp_path, n=dict(model=str(folders["sd35_t5"]), use_t5=False, t5_max_length=T5_LEN)).backbone("n")
    assert bb.text_encoder_3 is None
    assert bb.encode_text(["a photo of cat"]).embeds[:, 77:].abs().max() == 0


def test_encode_image_is_shifted_scaled_posterior_mean(bb):
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    z0 = bb.encode_image(images)
    assert z0.shape == (2, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE) and z0.dtype == torch.float32
    with torch.no_grad():
        mean = bb.vae.encode(images * 2 - 1).latent_dist.mean
    cfg = bb.vae.config
    torch.testing.assert_close(z0, (mean - cfg.shift_factor) * cfg.scaling_factor)
    # any input size is resized to the square VAE size
    assert bb.encode_image(torch.rand(1, 3, 20, 50)).shape == (1, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    with pytest.raises(InputError, match="RGB"):
        bb.encode_image(torch.rand(1, 4, IMAGE_SIZE, IMAGE_SIZE))


# ------------------------------------------------------------------------------------ denoiser
def test_predict_calls_transformer_with_flow_timesteps(bb):
    z0 = bb.encode_image(torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)).expand(3, -1, -1, -1)
    eps = torch.randn_like(z0)
    t = torch.tensor([20.0, 200.0, 951.0])
    z_t = bb.add_noise(z0, t, eps)
    cond = bb.encode_text(["a photo of cat, dog"])
    with torch.no_grad():
        v = bb.predict(z_t, t, cond)  # one condition shared by three latents
        direct = bb.denoiser(
            hidden_states=z_t,
            encoder_hidden_states=cond.embeds.expand(3, -1, -1),
            pooled_projections=cond.pooled.expand(3, -1),
            timestep=1000 * bb.alpha_sigma(t)[1],
        ).sample
    assert v.shape == z0.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    torch.testing.assert_close(v, direct)
    # the timestep matters: the three rows share z0 and text but get different predictions
    assert not torch.allclose(v[0], v[1]) and not torch.allclose(v[1], v[2])
    with pytest.raises(InputError, match="2 text conditions for 3 latents"):
        bb.predict(z_t, t, bb.encode_text(["a", "b"]))


# ------------------------------------------------------------------------------------ tokens
def test_token_spans_index_the_clip_part_of_the_joint_axis(bb):
    prompt = "a photo of cat, dog, traffic light"
    ids = bb.tokenizer(prompt, padding="max_length", max_length=77).input_ids
    for phrase in ("cat", "dog", "traffic light"):
        span = bb.token_spans(prompt, phrase)
        assert max(span) < 77  # the CLIP block is the first 77 positions of the joint axis
        phrase_ids = bb.tokenizer(phrase, add_special_tokens=False).input_ids
        assert [ids[i] for i in span] == phrase_ids
    assert bb.token_spans(prompt, "cat") == [4]  # BOS a photo of cat
    assert len(bb.token_spans(prompt, "traffic light")) == 2


def test_token_span_errors(bb):
    with pytest.raises(InputError, match="does not occur"):
        bb.token_spans("a photo of cat", "zebra")
    long_prompt = "a photo of " + ", ".join(["dog"] * 60) + ", cat"
    with pytest.raises(InputError, match="only reads 77 tokens"):
        bb.token_spans(long_prompt, "cat")


# ------------------------------------------------------------------------------------ bad input
def test_missing_folder_and_offline_hub_id(tmp_path):
    host = make_host(tmp_path, gone=dict(model=str(tmp_path / "nope")),
                     hub=dict(model="stabilityai/stable-diffusion-3.5-medium", offline=True))
    with pytest.raises(ModelLoadError, match="not found"):
        host.backbone("gone")
    with pytest.raises(ModelLoadError) as info:
        host.backbone("hub")
    assert "stabilityai/stable-diffusion-3.5-medium" in str(info.value)
    assert "local" in (info.value.fix or "")


def test_folder_of_another_model_family(tmp_path):
    folder = tmp_path / "sd15"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
         "scheduler": ["diffusers", "PNDMScheduler"]}))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion 3 folder"):
        make_host(tmp_path, x=dict(model=str(folder))).backbone("x")


@pytest.mark.parametrize("opts, match", [
    (dict(cross_weight=[1, 10]), "one resolution group"),
    (dict(self_weight=[[1, 0], [1]]), "self_weight"),
    (dict(image_size=30), "image_size 30 does not fit"),
    (dict(image_size=-4), "positive integer"),
    (dict(t5_max_length=0), "t5_max_length"),
])
def test_bad_options_are_config_errors(folders, tmp_path, opts, match):
    with pytest.raises(ConfigError, match=match):
        make_host(tmp_path, b=dict(model=str(folders["sd35"]), **opts)).backbone("b")


def test_non_default_image_size(folders, tmp_path):
    bb = make_host(tmp_path, s=dict(model=str(folders["sd35"]), image_size=16, t5_max_length=T5_LEN)).backbone("s")
    assert bb.grid == (4, 4) and {l.grid for l in bb.attention_layers()} == {(4, 4)}
    z0 = bb.encode_image(torch.rand(1, 3, 40, 40))
    assert z0.shape == (1, LATENT_CHANNELS, 8, 8)
    with torch.no_grad():
        v = bb.predict(z0, torch.tensor([50.0]), bb.encode_text(["a photo of cat"]))
    assert v.shape == z0.shape
