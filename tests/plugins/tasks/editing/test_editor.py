"""The editor on a tiny random SD model: attention replacement, null-text sources, local blend, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from t2ialign.core.errors import InputError, PluginError
from t2ialign.core.host import Host
from t2ialign.plugins.tasks.editing.editor import BlendMask, Editor, blend_mask
from t2ialign.plugins.tasks.editing.measurements import background_scores
from t2ialign.plugins.tasks.editing.task import build_editor, variants_of
from tests.helpers.editing import edit_config


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_attention_replacement_really_replaces(host, backbone, source, pair, guidance):
    editor = build_editor(edit_config(guidance=guidance, cross_replace_steps=0.5, self_replace_steps=0.25),
                          host, backbone)
    res = editor.edit(source, pair.target, record=True)
    ctrl = res.controller
    (s, t), = ctrl.pairs
    assert (s, t) == ((2, 3) if guidance != 1.0 else (0, 1))
    tgt_cols, src_cols = res.alignment.aligned
    unaligned = torch.nonzero(res.alignment.mapping < 0).flatten()
    cross = [r for r in ctrl.records if r["kind"] == "cross"]
    selfs = [r for r in ctrl.records if r["kind"] == "self"]
    assert {r["step"] for r in cross} == {0, 1} and {r["step"] for r in selfs} == {0}
    assert len(cross) == 2 * 7 and len(selfs) == 7
    for r in cross:
        before, after = r["before"], r["after"]
        assert not torch.equal(before[t][..., tgt_cols], before[s][..., src_cols])  # there was something to replace
        assert torch.equal(after[t][..., tgt_cols], before[s][..., src_cols])
        assert torch.equal(after[t][..., unaligned], before[t][..., unaligned])
        assert torch.equal(after[s], before[s])
    for r in selfs:
        assert torch.equal(r["after"][t], r["before"][s])


def test_null_text_source_feeds_its_embeddings_to_the_edit(host, backbone, pair):
    editor = build_editor(edit_config(guidance=3.0, inversion="null_text", **{"null_text.inner_steps": 2}),
                          host, backbone)
    src = editor.source_from_image(pair.image, pair.source)
    assert src.uncond is not None and len(src.uncond) == editor.steps
    seen = []
    original = backbone.predict

    def spy(z, t, cond):
        seen.append(cond.embeds.detach().clone())
        return original(z, t, cond)

    backbone.predict = spy
    try:
        editor.edit(src, pair.target)
    finally:
        del backbone.predict
    # guided calls batch [uncond x2, cond x2]: the uncond rows are the step's optimised embedding
    assert len(seen) == editor.steps
    for k, embeds in enumerate(seen):
        torch.testing.assert_close(embeds[0], src.uncond[k].embeds[0])
        torch.testing.assert_close(embeds[1], src.uncond[k].embeds[0])


def test_editing_on_an_mmdit_backbone_is_refused_naming_why(tmp_path):
    from tests.helpers.tiny_sd3 import make_tiny_sd3

    folder = make_tiny_sd3(tmp_path / "sd35", with_t5=False, dual_attention=True)
    reg = tmp_path / "reg.yaml"
    reg.write_text(json.dumps({"backbones": {"tiny3": {"plugin": "stable_diffusion_3", "model": str(folder)}}}))
    host = Host(registry_files=[reg])
    sd3 = host.backbone("tiny3")
    assert host.attention_editor(sd3) is None  # no built-in plugin edits joint attention
    with pytest.raises(PluginError, match="joint MM-DiT attention") as info:
        Editor(sd3, None, attention=host.attention_editor(sd3), steps=4)
    # the exact words of the refusal from before the controller moved behind the hook
    assert info.value.what == (
        "attention editing is not supported on backbone 'tiny3', whose attention is 'mmdit' (joint MM-DiT "
        "attention: image and text tokens share one softmax, so there is no separate cross-attention map to "
        "replace, and its text axis joins the CLIP and T5 tokens)")
    assert info.value.where == "editing"
    assert info.value.fix == ("edit with a UNet backbone: SD 1.x / 2.x, SDXL or the toy model; SD3 heatmaps and "
                              "segmentation work")
    assert "UNet backbone" in info.value.fix


def test_a_unet_backbone_nobody_answers_for_is_refused(backbone):
    with pytest.raises(PluginError, match="no plugin answers t2ialign_make_attention_editor") as info:
        Editor(backbone, None, attention=None, steps=4)
    assert "attention editing is not supported on backbone" in info.value.what


# ------------------------------------------------------------------------------------ local blend
def test_local_blend_keeps_unmasked_latents_and_pixels(editor, source, pair):
    masks = editor.masks(source, pair.words, pair.edit_words, variants_of(edit_config()), key=pair.id)
    assert set(masks) == {"baseline", "calibrated"}
    m = masks["calibrated"]
    assert m.latent.shape == source.latents.shape[-2:] and m.latent.dtype == torch.bool and m.latent.any()
    # random heatmaps give an almost full mask; a box mask makes the unmasked part large
    keep = torch.zeros_like(m.latent)
    keep[2:8, 2:8] = True
    region = np.zeros(m.region.shape, dtype=bool)
    region[4:16, 4:16] = True
    box = BlendMask("box", m.heat, m.labels, region, keep, region)
    for mask in (m, box):
        res = editor.edit(source, pair.target, mask)
        final = res.latents[1]
        # latent space: exactly the source trajectory's end point outside the mask, something new inside
        assert torch.equal(final[:, ~mask.latent], source.latents[-1][:, ~mask.latent])
        assert float((final[:, mask.latent] - source.latents[-1][:, mask.latent]).abs().mean()) > 1e-3
    # pixel space, before the paste: the decoder mixes latents (the tiny random VAE even globally,
    # through its mid-block attention), so outside the mask the decoded edit is only closer to the
    # source's decode than an edit without blend (measured PSNR 16.0 vs 14.0 dB)
    free = editor.edit(source, pair.target, None)
    assert free.decoded is free.image  # no mask, nothing pasted
    blended = background_scores(res.source_decoded, res.decoded, region)
    unblended = background_scores(free.source_decoded, free.image, region)
    assert blended["bg_psnr"] > unblended["bg_psnr"] + 1.0
    # after the paste (blend.paste, on by default): the source's own pixels outside the mask, exactly,
    # and the decoded edit inside it
    assert editor.paste
    assert np.array_equal(res.image[~region], source.image[~region])
    assert np.array_equal(res.image[region], res.decoded[region])
    assert not np.array_equal(res.image, res.decoded)
    empty = BlendMask("none", m.heat, m.labels, np.zeros_like(region), torch.zeros_like(keep),
                      np.zeros_like(region))
    same = editor.edit(source, pair.target, empty)
    assert torch.equal(same.latents[1], source.latents[-1])
    assert np.array_equal(same.decoded, same.source_decoded)  # an empty mask keeps every latent
    assert np.array_equal(same.image, source.image)  # ... and, pasted, every source pixel


def test_without_paste_the_edit_is_the_decoded_latent_blend(host, backbone, source, pair):
    editor = build_editor(edit_config(**{"blend.paste": "false"}), host, backbone)
    keep = torch.zeros(source.latents.shape[-2:], dtype=torch.bool)
    keep[2:8, 2:8] = True
    region = np.zeros(source.image.shape[:2], dtype=bool)
    region[4:16, 4:16] = True
    res = editor.edit(source, pair.target, BlendMask("box", torch.zeros(1), np.zeros(1), region, keep, region))
    assert res.image is res.decoded
    assert not np.array_equal(res.image[~region], source.image[~region])


def test_mask_noise_changes_only_the_target_rows_masked_start(host, backbone, source):
    keep = torch.zeros(source.latents.shape[-2:], dtype=torch.bool)
    keep[1:4, 2:6] = True
    keep = keep[None, None]
    first = source.latents[:1]
    assert build_editor(edit_config(), host, backbone).mask_noise == 1.0  # the default
    plain = build_editor(edit_config(**{"blend.mask_noise": 0.0}), host, backbone)
    assert plain.mask_noise == 0.0 and plain._start(first, keep) is first
    for lam in (0.5, 1.0):
        start = build_editor(edit_config(**{"blend.mask_noise": lam}), host, backbone)._start(first, keep)
        assert start.shape == (2, *first.shape[1:])
        assert torch.equal(start[0], first[0])  # the source row is the inverted latent
        inside, outside = keep[0].expand_as(first[0]), ~keep[0].expand_as(first[0])
        assert torch.equal(start[1][outside], first[0][outside])
        assert not torch.allclose(start[1][inside], first[0][inside])
    with pytest.raises(Exception, match="mask_noise must lie in"):
        build_editor(edit_config(**{"blend.mask_noise": 1.5}), host, backbone)


def test_paste_outside_is_exact_and_checks_shapes():
    from t2ialign.plugins.tasks.editing.editor import paste_outside

    rng = np.random.default_rng(0)
    src, edit = rng.integers(0, 256, (2, 12, 12, 3), dtype=np.uint8)
    region = rng.random((12, 12)) < 0.3
    out = paste_outside(src, edit, region)
    assert out.dtype == np.uint8 and out.shape == src.shape
    assert np.array_equal(out[region], edit[region]) and np.array_equal(out[~region], src[~region])
    with pytest.raises(InputError, match="shapes differ"):
        paste_outside(src, edit, region[:6])


def test_blend_mask_selects_the_edited_class_and_dilates():
    heat = torch.zeros(2, 32, 32)
    heat[0, 4:12, 4:12] = 1.0
    heat[1, 20:28, 20:28] = 1.0
    m = blend_mask(heat, ["circle", "star"], ["star"], threshold=0.5, dilate=1, latent_hw=(8, 8))
    assert m.region.sum() == 64 and m.region[20:28, 20:28].all()
    assert m.latent.sum() == (2 + 2) ** 2  # 2x2 latent cells, grown by one cell on each side
    assert m.image_mask[16:32, 16:32].all() and not m.image_mask[:16].any()
    with pytest.raises(InputError, match="not among the heatmap words"):
        blend_mask(heat, ["circle", "star"], ["heart"], threshold=0.5, dilate=1, latent_hw=(8, 8))
