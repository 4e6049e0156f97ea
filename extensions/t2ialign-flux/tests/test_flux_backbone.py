"""The ``flux`` backbone on tiny random FLUX.1 pipelines, loaded through the Host by registry name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_registry
from t2ialign.core.errors import ConfigError, InputError, ModelLoadError
from t2ialign.core.host import Host
from t2ialign.core.protocols import Backbone
from t2ialign_flux.flux import FluxBackbone, image_position_ids, pack_latents, unpack_latents
from tiny_flux import CLIP_WIDTH, IMAGE_SIZE, LATENT_CHANNELS, T5_WIDTH

T5_LEN = 16  # a short T5 axis keeps the tests fast; the default (512) is checked on its own
PROMPT = "a photo of cat, dog, red bus"


def _host(tmp_path: Path, **entries: dict) -> Host:
    reg = write_registry(tmp_path / "registry.yaml",
                         **{name: {"plugin": "flux", **opts} for name, opts in entries.items()})
    return Host(registry_files=[reg])


@pytest.fixture(scope="module")
def host(flux_folders, tmp_path_factory) -> Host:
    return _host(tmp_path_factory.mktemp("reg"), dev=dict(model=str(flux_folders["dev"]), t5_max_length=T5_LEN),
                 schnell=dict(model=str(flux_folders["schnell"]), t5_max_length=T5_LEN))


@pytest.fixture(scope="module")
def dev(host) -> FluxBackbone:
    return host.backbone("dev")


@pytest.fixture(scope="module")
def schnell(host) -> FluxBackbone:
    return host.backbone("schnell")


def _pipeline(folder: Path):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(folder)


# ------------------------------------------------------------------------------------ loading
def test_loads_through_the_registry_with_the_real_classes(dev, schnell):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    assert isinstance(dev, FluxBackbone) and isinstance(dev, Backbone)
    assert dev.prediction_type == "flow" and dev.attention_kind == "flux"
    assert isinstance(dev.denoiser, FluxTransformer2DModel) and isinstance(dev.vae, AutoencoderKL)
    assert isinstance(dev.text_encoder, CLIPTextModel) and isinstance(dev.text_encoder_2, T5EncoderModel)
    assert dev.image_size == IMAGE_SIZE and dev.grid == (8, 8) and dev.image_seq_len == 64
    assert dev.max_tokens == T5_LEN
    assert dev.schedule.mu is not None and dev.num_train_timesteps == 1000
    # guidance-distilled dev gets FluxPipeline's default scale, schnell none
    assert dev.guidance == 3.5 and schnell.guidance is None
    assert dev.layer_defaults == {"cross_weight": [1.0], "cross_gaussian_sigma": 0.0, "self_weight": [[1.0], [1.0]]}


def test_package_registry_entries_are_visible(host):
    entries = host.registry.entries["backbones"]
    assert entries["flux-dev"].plugin == "flux" and entries["flux-dev"].options["model"] == "black-forest-labs/FLUX.1-dev"
    assert entries["flux-schnell"].options["t5_max_length"] == 256


def test_hub_id_offline_and_missing_folder(tmp_path):
    host = _host(tmp_path, gone=dict(model=str(tmp_path / "nope")))
    with pytest.raises(ModelLoadError, match="not found"):
        host.backbone("gone")
    with pytest.raises(ModelLoadError) as info:
        Host(registry_files=[write_registry(tmp_path / "r2.yaml", **{"flux-dev": {"offline": True}})]).backbone("flux-dev")
    assert "black-forest-labs/FLUX.1-dev" in str(info.value) and "local" in (info.value.fix or "")


def test_folder_of_another_model_family(tmp_path):
    folder = tmp_path / "sd15"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
         "scheduler": ["diffusers", "PNDMScheduler"]}))
    with pytest.raises(ModelLoadError, match="not a FLUX.1 folder"):
        _host(tmp_path, x=dict(model=str(folder))).backbone("x")


@pytest.mark.parametrize("which, opts, match", [
    ("schnell", dict(guidance=3.5), "not guidance-distilled"),
    ("dev", dict(image_size=30), "image_size 30 does not fit"),
    ("dev", dict(t5_max_length=0), "t5_max_length"),
    ("dev", dict(t5_max_length=1024), "t5_max_length"),
    ("dev", dict(cross_weight=[1, 2]), "one resolution group"),
    ("dev", dict(self_weight=[[1, 0]]), "self_weight"),
])
def test_bad_options_are_config_errors(flux_folders, tmp_path, which, opts, match):
    with pytest.raises(ConfigError, match=match):
        _host(tmp_path, b=dict(model=str(flux_folders[which]), **opts)).backbone("b")


def test_default_t5_length_is_the_pipelines(flux_folders, tmp_path):
    bb = _host(tmp_path, d=dict(model=str(flux_folders["dev"]))).backbone("d")
    assert bb.max_tokens == 512
    assert bb.encode_text(["a photo of cat"]).embeds.shape == (1, 512, T5_WIDTH)


# ------------------------------------------------------------------------------------ encoders
def test_encode_text_equals_flux_pipeline_encode_prompt(dev, flux_folders):
    pipe = _pipeline(flux_folders["dev"])
    prompts = [PROMPT, "a photo of a man"]
    embeds, pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=T5_LEN)
    cond = dev.encode_text(prompts)
    assert cond.embeds.shape == (2, T5_LEN, T5_WIDTH) and cond.pooled.shape == (2, CLIP_WIDTH)
    torch.testing.assert_close(cond.embeds, embeds)
    torch.testing.assert_close(cond.pooled, pooled)
    assert text_ids.abs().max() == 0  # the text ids the backbone passes (zeros) are the pipeline's


def test_encode_image_is_shifted_scaled_posterior_mean(dev):
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    z0 = dev.encode_image(images)
    assert z0.shape == (2, LATENT_CHANNELS, 16, 16) and z0.dtype == torch.float32
    with torch.no_grad():
        mean = dev.vae.encode(images * 2 - 1).latent_dist.mean
    torch.testing.assert_close(z0, (mean - dev.vae.config.shift_factor) * dev.vae.config.scaling_factor)


# ------------------------------------------------------------------------------------ latent layout
def test_packing_matches_the_pipelines_layout():
    from diffusers import FluxPipeline

    z = torch.randn(2, LATENT_CHANNELS, 16, 16)
    packed = pack_latents(z)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(z, 2, LATENT_CHANNELS, 16, 16), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 16, 16), z, rtol=0, atol=0)
    # FluxPipeline._unpack_latents takes the pixel size and the VAE factor (2 for the tiny VAE)
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 32, 32, 2), z, rtol=0, atol=0)
    ids = image_position_ids(8, 8, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(ids, FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32))


# ------------------------------------------------------------------------------------ denoiser
def _noised(bb, t):
    gen = torch.Generator().manual_seed(3)
    z0 = bb.encode_image(torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)).expand(len(t), -1, -1, -1)
    return bb.add_noise(z0, t, torch.randn(z0.shape, generator=gen))


@pytest.mark.parametrize("which", ["dev", "schnell"])
def test_predict_equals_the_transformer_on_pipeline_inputs(request, which):
    from diffusers import FluxPipeline

    bb = request.getfixturevalue(which)
    t = torch.tensor([20.0, 500.0, 951.0])
    z_t = _noised(bb, t)
    cond = bb.encode_text([PROMPT])
    with torch.no_grad():
        v = bb.predict(z_t, t, cond)  # one condition shared by three latents
        sigma = bb.alpha_sigma(t)[1]
        direct = bb.denoiser(
            hidden_states=FluxPipeline._pack_latents(z_t, 3, LATENT_CHANNELS, 16, 16),
            encoder_hidden_states=cond.embeds.expand(3, -1, -1), pooled_projections=cond.pooled.expand(3, -1),
            timestep=sigma, img_ids=FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32),
            txt_ids=torch.zeros(T5_LEN, 3), guidance=torch.full((3,), 3.5) if which == "dev" else None,
        ).sample
    assert v.shape == z_t.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    torch.testing.assert_close(v, FluxPipeline._unpack_latents(direct, 32, 32, 2))
    assert not torch.allclose(v[0], v[1]) and not torch.allclose(v[1], v[2])  # the timestep matters


def test_guidance_reaches_the_transformer(dev):
    t = torch.tensor([300.0])
    z_t = _noised(dev, t)
    cond = dev.encode_text([PROMPT])
    with torch.no_grad():
        default = dev.predict(z_t, t, cond)
        dev.guidance = 7.0
        try:
            stronger = dev.predict(z_t, t, cond)
        finally:
            dev.guidance = 3.5
    assert not torch.allclose(default, stronger)


def test_pipeline_runs_on_the_backbones_noise_table(dev, flux_folders):
    """FluxPipeline itself (dynamic shift, mu from this image's token count) feeds the transformer
    exactly the timesteps the backbone assigns to the matching indices."""
    pipe = _pipeline(flux_folders["dev"])
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(float(kw["timestep"][0])), with_kwargs=True)
    try:
        pipe("a photo of cat", height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=4,
             max_sequence_length=T5_LEN, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    # 4 steps: raw noise fractions 1, .75, .5, .25 are the indices 999, 749, 499, 249
    expected = dev.model_timestep(torch.tensor([999.0, 749.0, 499.0, 249.0]))
    torch.testing.assert_close(torch.tensor(seen), expected, atol=1e-6, rtol=0)


def test_predict_input_errors(dev):
    t = torch.tensor([20.0, 200.0])
    z_t = _noised(dev, t)
    with pytest.raises(InputError, match="3 text conditions for 2 latents"):
        dev.predict(z_t, t, dev.encode_text(["a", "b", "c"]))
    with pytest.raises(InputError, match="works at 16x16"):
        dev.predict(torch.zeros(1, LATENT_CHANNELS, 8, 8), torch.tensor([5.0]), dev.encode_text(["a"]))
    with pytest.raises(InputError, match="timestep index out of range"):
        dev.alpha_sigma(torch.tensor([1000.0]))


# ------------------------------------------------------------------------------------ tokens and layers
def test_token_spans_are_t5_positions(dev):
    ids = dev.tokenizer_2(PROMPT, padding="max_length", max_length=T5_LEN).input_ids
    for phrase in ("cat", "dog", "red bus"):
        span = dev.token_spans(PROMPT, phrase)
        assert [ids[i] for i in span] == dev.tokenizer_2(phrase, add_special_tokens=False).input_ids
    assert dev.token_spans(PROMPT, "cat") == [3]  # no BOS in T5: a photo of cat
    assert len(dev.token_spans(PROMPT, "red bus")) == 2
    with pytest.raises(InputError, match="does not know"):
        dev.token_spans("a photo of zebra", "zebra")  # not in the tiny vocabulary -> <unk>
    with pytest.raises(InputError, match="only reads 16 tokens"):
        dev.token_spans("a photo of " + ", ".join(["dog"] * 10) + ", cat", "cat")


def test_attention_layers_are_the_double_then_single_stream_blocks(dev):
    layers = dev.attention_layers()
    assert [(l.name, l.kind, l.depth, l.place) for l in layers] == [
        ("transformer_blocks.0.attn", "joint", 0, "double"),
        ("transformer_blocks.1.attn", "joint", 1, "double"),
        ("single_transformer_blocks.0.attn", "joint", 2, "single"),
        ("single_transformer_blocks.1.attn", "joint", 3, "single"),
    ]
    assert {(l.grid, l.group) for l in layers} == {((8, 8), 0)}
    # and that is the order the transformer really runs them in
    order = []
    handles = [dev.denoiser.get_submodule(l.name).register_forward_pre_hook(lambda m, a, n=l.name: order.append(n))
               for l in layers]
    try:
        t = torch.tensor([100.0])
        with torch.no_grad():
            dev.predict(_noised(dev, t), t, dev.encode_text(["a photo of cat"]))
    finally:
        for h in handles:
            h.remove()
    assert order == [l.name for l in layers]
