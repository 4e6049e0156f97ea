"""The stable_diffusion_xl backbone plugin on a tiny random SDXL pipeline."""

from __future__ import annotations

import pytest
import torch

from t2ialign.core.aggregation import cross_layer_weights, self_layer_weights
from t2ialign.core.host import Host
from t2ialign.core.protocols import Backbone
from t2ialign.plugins.backbones.stable_diffusion import unet_attention_layers
from t2ialign.plugins.backbones.stable_diffusion_xl import StableDiffusionXLBackbone
from tests.helpers.tiny_models import IMAGE, LATENT, TEXT_HIDDEN, cached_tiny_sdxl, write_registry


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    reg = write_registry(tmp_path_factory.mktemp("xl") / "r.yaml", "tinyxl", "stable_diffusion_xl",
                         model=str(cached_tiny_sdxl()))
    return Host(registry_files=[reg]).backbone("tinyxl")


def test_loads_with_two_text_encoders(sdxl):
    assert isinstance(sdxl, StableDiffusionXLBackbone) and isinstance(sdxl, Backbone)
    assert sdxl.tokenizer_2.pad_token == "!" and sdxl.tokenizer.pad_token == "<|endoftext|>"
    assert sdxl.layer_defaults == {"cross_weight": [1, 1, 1], "cross_gaussian_sigma": 3.0,
                                   "self_weight": [[1, 0, 1], [0, 0, 1]]}


def test_encode_text_penultimate_concat_pooled_and_time_ids(sdxl):
    prompts = ["a photo of cat", "a photo of dog, tree"]
    cond = sdxl.encode_text(prompts)
    assert cond.embeds.shape == (2, 77, 2 * TEXT_HIDDEN)
    assert cond.pooled.shape == (2, 8)
    assert cond.extra["time_ids"].tolist() == [[IMAGE, IMAGE, 0, 0, IMAGE, IMAGE]] * 2
    with torch.no_grad():
        ids1 = sdxl.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        ids2 = sdxl.tokenizer_2(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        out1 = sdxl.text_encoder(ids1, output_hidden_states=True)
        out2 = sdxl.text_encoder_2(ids2, output_hidden_states=True)
    assert torch.allclose(cond.embeds[..., :TEXT_HIDDEN], out1.hidden_states[-2], atol=1e-6)
    assert torch.allclose(cond.embeds[..., TEXT_HIDDEN:], out2.hidden_states[-2], atol=1e-6)
    assert not torch.allclose(cond.embeds[..., :TEXT_HIDDEN], out1.last_hidden_state, atol=1e-3)
    assert torch.allclose(cond.pooled, out2.text_embeds, atol=1e-6)
    # the second tokenizer pads with "!" (id 0), the first with EOS
    assert ids2[0, -1].item() == 0 and ids1[0, -1].item() == 49407


def test_predict_uses_micro_conditioning(sdxl):
    cond = sdxl.encode_text(["a photo of cat"]).select([0, 0])
    z0 = sdxl.encode_image(torch.rand(2, 3, IMAGE, IMAGE))
    assert z0.shape == (2, 4, LATENT, LATENT)
    t = torch.tensor([51.0, 501.0])
    zt = sdxl.add_noise(z0, t, torch.randn_like(z0))
    pred = sdxl.predict(zt, t, cond)
    with torch.no_grad():
        ref = sdxl.unet(zt, t, encoder_hidden_states=cond.embeds,
                        added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.extra["time_ids"]}).sample
    assert torch.allclose(pred, ref, atol=1e-5)
    # a different target size really changes the prediction (the time ids are used)
    other = cond.select([0, 1])
    other.extra["time_ids"] = other.extra["time_ids"] * 2
    assert not torch.allclose(sdxl.predict(zt, t, other), pred, atol=1e-4)


def test_three_resolution_groups_and_defaults_are_usable(sdxl):
    layers = sdxl.attention_layers()
    cross = [l for l in layers if l.kind == "cross"]
    assert [l.grid[0] for l in cross] == [8, 4, 4, 4, 4, 4, 4, 4, 4, 8, 8]
    assert max(l.group for l in cross) == 2
    d = sdxl.layer_defaults
    w = cross_layer_weights(layers, group_weights=d["cross_weight"], gaussian_sigma=d["cross_gaussian_sigma"])
    # Gaussian centred on the mid block: l_mid = 3 down + (2 - 1) / 2 = 3.5
    cw = w[[i for i, l in enumerate(layers) if l.kind == "cross"]]
    assert cw[3] == cw[4] and cw[3] == cw.max()
    rows = self_layer_weights(layers, d["self_weight"])
    assert (rows.sum(dim=1) > 0).all()


def test_full_size_sdxl_layout_on_meta_device():
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=128, cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
        block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    layers = unet_attention_layers(unet, (128, 128))
    cross = [l for l in layers if l.kind == "cross"]
    # method-spec §6.4: 70 + 70 layers, down 64:4, 32:20, mid 32:10, up 32:30, 64:6; 3 groups
    assert len(cross) == 70 and len(layers) == 140
    grids = [l.grid[0] for l in cross]
    assert grids == [64] * 4 + [32] * 20 + [32] * 10 + [32] * 30 + [64] * 6
    assert sum(1 for l in cross if l.place == "mid") == 10
    assert max(l.group for l in cross) + 1 == 3
