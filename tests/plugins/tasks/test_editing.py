"""Prompt-to-Prompt editing with a heatmap local blend, on a tiny random SD model and toy scenes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from t2ialign.core.cli import main
from t2ialign.core.errors import ConfigError, InputError, PluginError
from t2ialign.core.host import Host
from t2ialign.core.report import save_png
from t2ialign.plugins.datasets.toy_shapes import make_toy_shapes
from t2ialign.plugins.tasks import editing as ed
from tests.helpers.tiny_models import IMAGE, cached_tiny_sd

ARCH = "t2ialign-test-edit-clip"
CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
FAST = ["steps=4", "elbo.timesteps=[[1, 999, 250]]", "collect.timesteps=[[20, 101, 40]]", "collect.batch_size=2",
        "layers.cross_weight=[1, 1, 1, 1, 1]", "layers.self_weight=[[1, 0, 0, 0, 1], [0, 0, 0, 0, 1]]",
        "bootstrap=50", "visuals=2"]


BASE_REGISTRY = (
    "backbones:\n  tiny: {{plugin: stable_diffusion, model: '{model}'}}\n"
    "datasets:\n  toy_small: {{plugin: toy_shapes, n_test: 20}}\n"
    "tasks:\n  editing: {{plugin: editing}}\n"
)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = tmp_path_factory.mktemp("edit") / "reg.yaml"
    reg.write_text(BASE_REGISTRY.format(model=cached_tiny_sd()))
    return reg


@pytest.fixture(scope="module")
def clip_registry(tmp_path_factory):
    """The base registry plus a tiny random open_clip model as ``clip_tiny`` and the toy oracle."""
    import open_clip

    root = tmp_path_factory.mktemp("edit-clip")
    (root / f"{ARCH}.json").write_text(json.dumps(CLIP_CONFIG))
    open_clip.add_model_config(root / f"{ARCH}.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model(ARCH, pretrained=None).state_dict(), root / "clip.pt")
    reg = root / "reg.yaml"
    reg.write_text(
        BASE_REGISTRY.format(model=cached_tiny_sd())
        + f"metrics:\n  clip_tiny: {{plugin: clip_score, model: {ARCH}, pretrained: '{root / 'clip.pt'}'}}\n"
        "  oracle: {plugin: toy_oracle}\n"
    )
    return reg


@pytest.fixture(scope="module")
def host(registry):
    return Host(registry_files=[registry])


@pytest.fixture(scope="module")
def backbone(host):
    return host.backbone("tiny")


def _config(**extra):
    from t2ialign.core.config import resolve_config

    return resolve_config(ed.DEFAULTS, None, ["backbone=tiny", *FAST] + [f"{k}={v}" for k, v in extra.items()])


@pytest.fixture(scope="module")
def editor(host, backbone):
    return ed.build_editor(_config(), host, backbone)


@pytest.fixture(scope="module")
def pair():
    return ed.toy_edit_pairs(make_toy_shapes({"n_test": 20}, "test"), 1, seed=0)[0]


@pytest.fixture(scope="module")
def source(editor, pair):
    return editor.source_from_image(pair.image, pair.source)


# ------------------------------------------------------------------------------------ alignment
def test_same_length_swap_maps_every_token(backbone):
    a = ed.align_prompts(backbone.tokenizer, "a photo of a red circle", "a photo of a blue circle")
    assert a.changed == [4]
    n = a.source_spans[-1][-1] + 1
    # the swapped word takes the old word's attention; every other token (BOS, EOS, padding) maps to itself
    assert torch.equal(a.mapping, torch.arange(77))
    assert a.target_spans[4] == a.source_spans[4] == [5] and n == 7
    assert ed.edited_nouns(a, ["circle"]) == ["circle"]


def test_different_lengths_align_shared_words_only(backbone):
    a = ed.align_prompts(backbone.tokenizer, "a red circle and a star", "a red circle and a big heart")
    assert a.source_words[-1] == "star" and a.changed == [5]
    big, heart = a.target_spans[5], a.target_spans[6]
    assert all(int(a.mapping[p]) == -1 for p in big + heart)  # 1 word -> 2 words: the target's own attention
    for s_span, t_span in zip(a.source_spans[:5], a.target_spans[:5]):
        assert [int(a.mapping[p]) for p in t_span] == s_span
    eos_s, eos_t = a.source_spans[-1][-1] + 1, a.target_spans[-1][-1] + 1
    assert int(a.mapping[eos_t]) == eos_s and int(a.mapping[eos_t + 3]) == eos_s + 3
    assert ed.edited_nouns(a, ["circle", "star"]) == ["star"]
    # an inserted attribute belongs to the noun after it
    b = ed.align_prompts(backbone.tokenizer, "a circle and a star", "a circle and a green star")
    assert ed.edited_nouns(b, ["circle", "star"]) == ["star"]


def test_too_long_or_empty_prompts_are_refused(backbone):
    with pytest.raises(InputError, match="more than the 77"):
        ed.align_prompts(backbone.tokenizer, " ".join(["circle"] * 80), "a circle")
    with pytest.raises(InputError, match="empty"):
        ed.align_prompts(backbone.tokenizer, "a circle", "   ")


# ------------------------------------------------------------------------------------ controller
def _controller(steps=4, cross=1.0, self_=1.0, pairs=((0, 1),), batch=2, record=False):
    return ed.AttentionEditController(steps=steps, cross_replace_steps=cross, self_replace_steps=self_,
                                      token_map=torch.arange(77), pairs=pairs, batch=batch, record=record)


def _processors(backbone):
    return {name: proc for name, proc in backbone.unet.attn_processors.items()}


def test_controller_installs_and_restores_processors_also_on_errors(backbone):
    before = _processors(backbone)
    ctrl = _controller()
    with ctrl.installed(backbone):
        inside = _processors(backbone)
        assert all(isinstance(p, ed.EditProcessor) for p in inside.values())
        assert ctrl.layers == len(before) == 14
    assert _processors(backbone) == before
    with pytest.raises(RuntimeError, match="boom"):
        with ctrl.installed(backbone):
            raise RuntimeError("boom")
    assert _processors(backbone) == before


def test_explicit_attention_without_edits_matches_the_original_processors(backbone):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=gen)
    cond = backbone.encode_text(["a red circle", "a blue star"])
    t = torch.tensor([500.0, 500.0])
    ref = backbone.predict(z, t, cond)
    ctrl = _controller(pairs=())  # explicit path on every layer, nothing replaced
    with ctrl.installed(backbone):
        out = backbone.predict(z, t, cond)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    ctrl = _controller(batch=3)
    with ctrl.installed(backbone), pytest.raises(PluginError, match="batch of 3 rows"):
        backbone.predict(z, t, cond)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_attention_replacement_really_replaces(host, backbone, source, pair, guidance):
    editor = ed.build_editor(_config(guidance=guidance, cross_replace_steps=0.5, self_replace_steps=0.25),
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


def test_reweight_factor_one_is_the_identity_and_other_factors_scale(backbone):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 16, 16, generator=gen)
    cond = backbone.encode_text(["a red circle", "a blue circle"])
    t = torch.tensor([400.0, 400.0])
    ref = backbone.predict(z, t, cond)
    # no replacement at all (both schedules 0): only the reweighting acts, on row 1's token 3
    ident = ed.AttentionEditController(steps=4, cross_replace_steps=0.0, self_replace_steps=0.0,
                                       token_map=torch.arange(77), pairs=((0, 1),), batch=2, reweight={3: 1.0})
    with ident.installed(backbone):
        torch.testing.assert_close(backbone.predict(z, t, cond), ref, rtol=1e-4, atol=1e-5)
    double = ed.AttentionEditController(steps=4, cross_replace_steps=0.0, self_replace_steps=0.0,
                                        token_map=torch.arange(77), pairs=((0, 1),), batch=2, reweight={3: 2.0},
                                        record=True)
    with double.installed(backbone):
        out = backbone.predict(z, t, cond)
    # row 0 (no target of any pair) goes through the explicit path unchanged
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out[1], ref[1], atol=1e-4)
    cross = [r for r in double.records if r["kind"] == "cross"]
    assert cross and not [r for r in double.records if r["kind"] == "self"]
    for r in cross:
        torch.testing.assert_close(r["after"][1][..., 3], 2 * r["before"][1][..., 3])
        assert torch.equal(r["after"][1][..., :3], r["before"][1][..., :3])
        assert torch.equal(r["after"][0], r["before"][0])
    with pytest.raises(ConfigError, match="reweight factor"):
        ed.AttentionEditController(steps=4, cross_replace_steps=0.0, self_replace_steps=0.0,
                                   token_map=torch.arange(77), pairs=((0, 1),), batch=2, reweight={3: float("nan")})


def test_per_word_replace_schedules(backbone):
    """Token 2 is replaced for 1 of 4 steps, every other aligned token for 3 (cross_replace_steps 0.75)."""
    ctrl = ed.AttentionEditController(steps=4, cross_replace_steps=0.75, self_replace_steps=0.0,
                                      token_map=torch.arange(77), pairs=((0, 1),), batch=2,
                                      column_replace_steps={2: 0.25}, record=True)
    probs = torch.softmax(torch.randn(2, 2, 5, 77), dim=-1)
    for step in range(4):
        ctrl.step = step
        assert ctrl.wants("cross", 5) == (step < 3)
        if ctrl.wants("cross", 5):
            out = ctrl.edit("cross", "layer", probs)
            assert torch.equal(out[1][..., 2], probs[0][..., 2] if step < 1 else probs[1][..., 2])
            assert torch.equal(out[1][..., 5], probs[0][..., 5])


def test_word_options_name_target_words(backbone):
    a = ed.align_prompts(backbone.tokenizer, "a photo of a red circle", "a photo of a blue circle")
    cols = ed.word_columns(a, {"Blue": 2.0}, "reweight")
    assert list(cols) == a.target_spans[4] and set(cols.values()) == {2.0}
    with pytest.raises(InputError, match="'dragon', which is not a word of the target prompt"):
        ed.word_columns(a, {"dragon": 2.0}, "reweight")
    with pytest.raises(ConfigError, match="must map target words to numbers"):
        ed.Editor(backbone, None, steps=4, reweight={"blue": "lots"})


def test_alignment_modes_replace_and_refine(backbone):
    tok = backbone.tokenizer
    swap = ("a photo of a red circle", "a photo of a blue circle")
    auto = ed.align_prompts(tok, *swap)
    assert torch.equal(ed.align_prompts(tok, *swap, mode="replace").mapping, auto.mapping)
    refine = ed.align_prompts(tok, *swap, mode="refine")
    blue = auto.target_spans[4]
    assert (auto.mapping[blue] >= 0).all() and (refine.mapping[blue] == -1).all()
    unchanged = [p for i, span in enumerate(auto.target_spans) if i != 4 for p in span]
    assert torch.equal(refine.mapping[unchanged], auto.mapping[unchanged])
    with pytest.raises(InputError, match="not a word swap"):
        ed.align_prompts(tok, "a circle", "a striped circle", mode="replace")
    added = ed.align_prompts(tok, "a circle", "a striped circle", mode="refine")
    assert (added.mapping[added.target_spans[1]] == -1).all()
    with pytest.raises(ConfigError, match="alignment must be one of"):
        ed.align_prompts(tok, *swap, mode="swap")


def test_null_text_source_feeds_its_embeddings_to_the_edit(host, backbone, pair):
    editor = ed.build_editor(_config(guidance=3.0, inversion="null_text", **{"null_text.inner_steps": 2}),
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
    sd3 = Host(registry_files=[reg]).backbone("tiny3")
    with pytest.raises(PluginError, match="joint MM-DiT attention") as info:
        ed.Editor(sd3, None, steps=4)
    assert "UNet backbone" in info.value.fix
    with pytest.raises(PluginError, match="not supported"):
        with _controller().installed(sd3):
            pass


# ------------------------------------------------------------------------------------ local blend
def test_local_blend_keeps_unmasked_latents_and_pixels(editor, source, pair):
    masks = editor.masks(source, pair.words, pair.edit_words, ed.variants_of(_config()), key=pair.id)
    assert set(masks) == {"baseline", "calibrated"}
    m = masks["calibrated"]
    assert m.latent.shape == source.latents.shape[-2:] and m.latent.dtype == torch.bool and m.latent.any()
    # random heatmaps give an almost full mask; a box mask makes the unmasked part large
    keep = torch.zeros_like(m.latent)
    keep[2:8, 2:8] = True
    region = np.zeros(m.region.shape, dtype=bool)
    region[4:16, 4:16] = True
    box = ed.BlendMask("box", m.heat, m.labels, region, keep, region)
    for mask in (m, box):
        res = editor.edit(source, pair.target, mask)
        final = res.latents[1]
        # latent space: exactly the source trajectory's end point outside the mask, something new inside
        assert torch.equal(final[:, ~mask.latent], source.latents[-1][:, ~mask.latent])
        assert float((final[:, mask.latent] - source.latents[-1][:, mask.latent]).abs().mean()) > 1e-3
    # pixel space: the decoder mixes latents (the tiny random VAE even globally, through its mid-block
    # attention), so outside the mask the edit is only closer to the source's decode than an edit
    # without blend (measured PSNR 16.0 vs 14.0 dB); an empty mask keeps every pixel
    free = editor.edit(source, pair.target, None)
    blended = ed.background_scores(res.source_decoded, res.image, region)
    unblended = ed.background_scores(free.source_decoded, free.image, region)
    assert blended["bg_psnr"] > unblended["bg_psnr"] + 1.0
    empty = ed.BlendMask("none", m.heat, m.labels, np.zeros_like(region), torch.zeros_like(keep),
                         np.zeros_like(region))
    same = editor.edit(source, pair.target, empty)
    assert torch.equal(same.latents[1], source.latents[-1])
    assert np.array_equal(same.image, same.source_decoded)


def test_blend_mask_selects_the_edited_class_and_dilates():
    heat = torch.zeros(2, 32, 32)
    heat[0, 4:12, 4:12] = 1.0
    heat[1, 20:28, 20:28] = 1.0
    m = ed.blend_mask(heat, ["circle", "star"], ["star"], threshold=0.5, dilate=1, latent_hw=(8, 8))
    assert m.region.sum() == 64 and m.region[20:28, 20:28].all()
    assert m.latent.sum() == (2 + 2) ** 2  # 2x2 latent cells, grown by one cell on each side
    assert m.image_mask[16:32, 16:32].all() and not m.image_mask[:16].any()
    with pytest.raises(InputError, match="not among the heatmap words"):
        ed.blend_mask(heat, ["circle", "star"], ["heart"], threshold=0.5, dilate=1, latent_hw=(8, 8))


def test_background_scores_ignore_the_allowed_region():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    region = np.zeros((32, 32), dtype=bool)
    region[8:16, 8:16] = True
    b = a.copy()
    b[region] = 0
    inside = ed.background_scores(a, b, region)
    assert inside["bg_psnr"] == float("inf") and inside["bg_fraction"] == pytest.approx(1 - 64 / 1024)
    c = a.copy()
    c[0, 0] = 255 - c[0, 0]
    outside = ed.background_scores(a, c, region)
    assert np.isfinite(outside["bg_psnr"]) and outside["bg_ssim"] < 1.0


def test_toy_edit_pairs_change_exactly_one_object():
    ds = make_toy_shapes({"n_test": 30}, "test")
    pairs = ed.toy_edit_pairs(ds, 6, seed=3)
    again = ed.toy_edit_pairs(ds, 6, seed=3)
    assert [p.target for p in pairs] == [p.target for p in again] and len(pairs) == 6
    assert [p.kind for p in pairs] == ["colour", "shape"] * 3
    for p in pairs:
        assert len(p.words) == len(set(p.words)) >= 2 and p.source != p.target
        diff = [i for i, (a, b) in enumerate(zip(p.objects, p.target_objects)) if a != b]
        assert diff == [p.edited] and p.edit_words == [p.objects[p.edited]["shape"]]
        key = "colour" if p.kind == "colour" else "shape"
        assert p.objects[p.edited][key] != p.target_objects[p.edited][key]
        assert p.object_mask.any() and (p.allowed | ~p.object_mask).all()


def test_paired_difference():
    d = ed.paired_difference([1.0, 2.0, float("nan")], [2.0, 4.0, 5.0], n=100, seed=0)
    assert d["delta"] == pytest.approx(1.5) and d["items"] == 2
    assert d["ci95_low"] <= 1.5 <= d["ci95_high"]


# ------------------------------------------------------------------------------------ task + CLI
def test_eval_editing_writes_everything_and_resumes(clip_registry, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--registry", str(clip_registry), "eval", "editing", "--backbone", "tiny", "--dataset", "toy_small",
            "--limit", "2", "--output", str(out), *FAST, "clip_metric=clip_tiny", "oracle_metric=oracle"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["items"] == 2 and results["edit_kinds"] == {"colour": 1, "shape": 1}
    for name in ("baseline", "calibrated"):
        v = results["variants"][name]
        assert 0 <= v["mask_fraction"] <= 1 and v["bg_ssim"] <= 1
        assert v["clip_score"]["prompts"] == 2 and -100 <= v["clip_score"]["clip_score"] <= 100
        assert set(v["oracle"]) == {"edited", "others", "full"}
    diffs = results["paired_differences"]["calibrated"]
    assert {"clip_score", "bg_psnr", "mask_iou", "oracle_full"} <= set(diffs)
    assert len(list((out / "edits").glob("*.npz"))) == 2 and len(list((out / "visuals").glob("*.png"))) == 2
    assert "calibrated - baseline" in (out / "report.html").read_text()
    lines = (out / "records.rank0.jsonl").read_text().splitlines()
    assert main(args) == 0  # resumes: nothing recomputed, same numbers
    assert (out / "records.rank0.jsonl").read_text().splitlines() == lines
    capsys.readouterr()
    assert main(args[:-2] + ["clip_metric=clip_tiny", "oracle_metric=oracle", "gamma=0.5"]) == 2
    assert "different gamma" in capsys.readouterr().err


def test_edit_command_writes_both_variants(clip_registry, tmp_path, capsys):
    image = make_toy_shapes({}, "test")[0].image
    path = save_png(tmp_path / "scene.png", image)
    out = tmp_path / "edit"
    code = main(["--registry", str(clip_registry), "edit", str(path), "--source", "a photo of a red circle and a star",
                 "--target", "a photo of a blue circle and a star", "--words", "circle", "star",
                 "--backbone", "tiny", "--output", str(out), *FAST, "clip_metric=clip_tiny"])
    assert code == 0
    summary = json.loads((out / "scene_edit.json").read_text())
    assert summary["edit_words"] == ["circle"]
    assert set(summary["variants"]) == {"baseline", "calibrated"}
    assert all(np.isfinite(v["clip_score"]) for v in summary["variants"].values())
    for name in ("scene_edit_baseline.png", "scene_edit_calibrated.png", "scene_edit_panel.png"):
        assert (out / name).is_file()
    from t2ialign.core.images import load_rgb

    assert load_rgb(out / "scene_edit_calibrated.png").shape == (IMAGE, IMAGE, 3)
