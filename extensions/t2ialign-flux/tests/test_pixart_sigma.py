"""The ``pixart_sigma`` backbone on a tiny random PixArt-Sigma pipeline, loaded through the Host."""

from __future__ import annotations

import pytest
import torch

from conftest import write_registry
from t2ialign.core.cli import main
from t2ialign.core.errors import ConfigError, InputError, ModelLoadError
from t2ialign.core.host import Host
from t2ialign.core.protocols import Backbone
from t2ialign_flux.pixart import PixArtSigmaBackbone
from tiny_flux import IMAGE_SIZE, LATENT_CHANNELS, T5_WIDTH
from tiny_pixart import PIXART_SCHEDULER

T5_LEN = 16
PROMPT = "a photo of cat, dog"


@pytest.fixture(scope="module")
def host(pixart_folder, tmp_path_factory) -> Host:
    reg = write_registry(tmp_path_factory.mktemp("reg") / "r.yaml",
                         px={"plugin": "pixart_sigma", "model": str(pixart_folder), "t5_max_length": T5_LEN})
    return Host(registry_files=[reg])


@pytest.fixture(scope="module")
def bb(host) -> PixArtSigmaBackbone:
    return host.backbone("px")


def _noised(bb, t):
    gen = torch.Generator().manual_seed(2)
    z0 = bb.encode_image(torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)).expand(len(t), -1, -1, -1)
    return bb.add_noise(z0, t, torch.randn(z0.shape, generator=gen))


def test_loads_through_the_registry_with_the_real_classes(bb, host):
    from diffusers import PixArtTransformer2DModel
    from transformers import T5EncoderModel

    assert isinstance(bb, Backbone) and isinstance(bb.denoiser, PixArtTransformer2DModel)
    assert isinstance(bb.text_encoder, T5EncoderModel)
    assert bb.prediction_type == "epsilon" and bb.attention_kind == "unet" and bb.learned_sigma
    assert bb.image_size == IMAGE_SIZE and bb.grid == (8, 8) and bb.max_tokens == T5_LEN
    assert host.registry.entries["backbones"]["pixart-sigma"].plugin == "pixart_sigma"


def test_schedule_is_the_schedulers_alphas_cumprod(bb):
    from diffusers import DPMSolverMultistepScheduler

    acp = DPMSolverMultistepScheduler(**PIXART_SCHEDULER).alphas_cumprod
    t = torch.arange(1000.0)
    alpha, sigma = bb.alpha_sigma(t)
    torch.testing.assert_close(alpha ** 2, acp, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sigma ** 2, 1 - acp, atol=1e-6, rtol=1e-5)


def test_encode_text_equals_pipeline_encode_prompt(bb, pixart_folder):
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(pixart_folder)
    prompts = [PROMPT, "a photo of a red bus and a man"]
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, clean_caption=False,
                                            max_sequence_length=T5_LEN)
    cond = bb.encode_text(prompts)
    assert cond.embeds.shape == (2, T5_LEN, T5_WIDTH)
    torch.testing.assert_close(cond.embeds, embeds)
    assert torch.equal(cond.extra["mask"], mask)
    assert mask.sum(1).tolist() == [len(bb.tokenizer(p).input_ids) for p in prompts]


def test_predict_is_the_epsilon_half_of_the_pipelines_transformer_call(bb):
    t = torch.tensor([20.0, 500.0, 951.0])
    z_t = _noised(bb, t)
    cond = bb.encode_text([PROMPT, "a photo of a red bus and a man", "a photo of dog"])
    with torch.no_grad():
        eps = bb.predict(z_t, t, cond)
        # what PixArtSigmaPipeline feeds the transformer: every padded T5 position, masked
        full = bb.denoiser(z_t, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.extra["mask"],
                           timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert full.shape[1] == 2 * LATENT_CHANNELS  # epsilon and the learned variance
    assert eps.shape == z_t.shape and eps.dtype == torch.float32
    torch.testing.assert_close(eps, full[:, :LATENT_CHANNELS], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(eps[0], eps[1])
    with pytest.raises(InputError, match="2 text conditions for 3 latents"):
        bb.predict(z_t, t, bb.encode_text(["a", "b"]))


def test_captured_cross_maps_equal_the_masked_softmax_of_the_model(bb, host):
    t = torch.tensor([100.0, 600.0])
    z_t = _noised(bb, t)
    cond = bb.encode_text([PROMPT])
    cols = bb.token_spans(PROMPT, "cat") + bb.token_spans(PROMPT, "dog")
    seen, handles = {}, []
    for layer in bb.attention_layers():
        if layer.kind == "cross":
            def hook(_m, args, kwargs, name=layer.name):
                seen[name] = (args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"])
            handles.append(bb.denoiser.get_submodule(layer.name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            plain = bb.predict(z_t, t, cond)
            with host.extractor(bb).capture(token_indices=cols) as store:
                captured = bb.predict(z_t, t, cond)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(plain, captured)  # outputs unchanged by capture
    assert store.hooked == {"cross": 2, "self": 2}
    mask = cond.extra["mask"][0].bool()
    for name, (hs, ehs) in seen.items():
        attn = bb.denoiser.get_submodule(name)
        # the full padded T5 axis, masked as the pipeline masks it (padding values are irrelevant: masked)
        keys = torch.cat([ehs[:1, : int(mask.sum())], torch.zeros(1, T5_LEN - int(mask.sum()), ehs.shape[-1])], 1)
        with torch.no_grad():
            q = attn.to_q(hs).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            k = attn.to_k(keys.expand(hs.shape[0], -1, -1)).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            logits = q @ k.transpose(-1, -2) * attn.scale + (~mask).float() * -10000.0
            probs = logits.softmax(-1).mean(1)
        torch.testing.assert_close(store.cross[name], probs[..., cols], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("opts, error, match", [
    (dict(image_size=30), ConfigError, "image_size"),
    (dict(t5_max_length=0), ConfigError, "t5_max_length"),
    (dict(self_weight=[[0]]), ConfigError, "self_weight"),
])
def test_bad_options(pixart_folder, tmp_path, opts, error, match):
    reg = write_registry(tmp_path / "r.yaml", b={"plugin": "pixart_sigma", "model": str(pixart_folder), **opts})
    with pytest.raises(error, match=match):
        Host(registry_files=[reg]).backbone("b")


def test_flux_folder_is_not_a_pixart_folder(flux_folders, tmp_path):
    reg = write_registry(tmp_path / "r.yaml", b={"plugin": "pixart_sigma", "model": str(flux_folders["dev"])})
    with pytest.raises(ModelLoadError, match="not a PixArt folder"):
        Host(registry_files=[reg]).backbone("b")


def test_segmentation_runs_end_to_end(pixart_folder, tmp_path):
    import json

    reg = tmp_path / "reg.yaml"
    reg.write_text(f"backbones:\n  tinypx: {{plugin: pixart_sigma, model: '{pixart_folder}', t5_max_length: 16}}\n"
                   "datasets:\n  toy_small: {plugin: toy_shapes, n_val: 2, n_test: 3, image_size: 64}\n")
    out = tmp_path / "run"
    assert main(["--registry", str(reg), "eval", "segmentation", "--backbone", "tinypx", "--dataset", "toy_small",
                 "--output", str(out), "elbo.timesteps=[[1, 999, 250]]", "collect.timesteps=[[20, 101, 40]]",
                 "collect.batch_size=2", "layers.cross_weight=[1]", "layers.self_weight=[[1], [1]]",
                 "bootstrap=50", "visuals=2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == 3
    assert all(0.0 <= results["variants"][v]["miou"] <= 100.0 for v in ("baseline", "calibrated"))


def test_pixart_alpha_micro_conditioning_is_refused(pixart_folder, tmp_path):
    import json
    import shutil

    folder = tmp_path / "alpha"
    shutil.copytree(pixart_folder, folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "use_additional_conditions": True}))
    reg = write_registry(tmp_path / "r.yaml", a={"plugin": "pixart_sigma", "model": str(folder)})
    with pytest.raises(ModelLoadError, match="micro-conditioning"):
        Host(registry_files=[reg]).backbone("a")
