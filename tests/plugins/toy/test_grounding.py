"""Tests of the toy model's optional grounding loss: token table, loss values, probe, training run."""

from __future__ import annotations

import pytest
import torch

from t2ialign.core.attention_processors import attention_probs
from t2ialign.core.errors import ConfigError
from t2ialign.core.fileio import read_jsonl
from t2ialign.plugins.toy.world import CLASS_NAMES
from t2ialign.plugins.toy import grounding, train
from tests.helpers.toy_configs import tiny


def test_class_token_table_maps_every_piece_of_a_class_word():
    tok = train.build_tokenizer()
    table = grounding.class_token_table(tok, CLASS_NAMES)
    ids = tok("a photo of a red hexagon and a small blue circle", add_special_tokens=False).input_ids
    classes = table[torch.tensor(ids)].tolist()
    hexagon, circle = CLASS_NAMES.index("hexagon") + 1, CLASS_NAMES.index("circle") + 1
    assert classes.count(hexagon) == len(tok("hexagon", add_special_tokens=False).input_ids) == 2
    assert classes.count(circle) == 1
    assert sum(c > 0 for c in classes) == 3  # colours, sizes, articles are not supervised
    with pytest.raises(ConfigError, match="share the token"):
        grounding.class_token_table(tok, ["circle", "circle"])


def test_colour_words_take_the_class_of_the_object_they_describe():
    tok = train.build_tokenizer()
    table = grounding.class_token_table(tok, CLASS_NAMES)
    colours = grounding.word_token_ids(tok, ["red", "blue", "orange"])
    prompts = ["a photo of a small red circle, a blue hexagon and an orange star", "a photo of red", "a photo of star"]
    ids = tok(prompts, padding="max_length", max_length=24, return_tensors="pt").input_ids
    out = grounding.attribute_token_classes(ids, table[ids], colours)
    circle, hexagon, star = (CLASS_NAMES.index(n) + 1 for n in ("circle", "hexagon", "star"))
    words = [tok.decode([i]).strip() for i in ids[0].tolist()]
    assert out[0, words.index("red")] == circle and out[0, words.index("blue")] == hexagon
    assert out[0, words.index("orange")] == star
    assert out[0, words.index("small")] == 0  # sizes are not attributes here
    assert torch.equal(out[0][table[ids][0] > 0], table[ids][0][table[ids][0] > 0])  # class words kept
    assert out[1].sum() == 0  # a colour with no noun after it is not supervised
    assert torch.equal(out[2], table[ids][2])


@pytest.mark.parametrize("mass, expected", [(0.6, 0.0), (0.5, 0.0), (0.25, 0.0625), (0.0, 0.25)])
def test_pixel_mass_loss_asks_object_pixels_to_read_their_own_words(mass, expected):
    # 4x4 grid, class 1 on the left half; text positions: 0 padding, 1 class word, 2 its colour
    left = torch.zeros(4, 4)
    left[:, :2] = 1
    masks = torch.stack([1 - left, left])[None]
    probs = torch.zeros(1, 16, 3)
    probs[0, :, 1] = probs[0, :, 2] = mass / 2  # the object's two words share `mass`
    probs[0, :, 0] = 1 - mass
    classes = torch.tensor([[0, 1, 1]])
    loss = grounding.pixel_mass_loss([probs], classes, masks, torch.tensor([True]), target=0.5)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # pixels outside every captioned object and unsupervised timesteps do not count
    probs[0, left.flatten() == 0, 0] = 1.0
    probs[0, left.flatten() == 0, 1:] = 0.0
    assert grounding.pixel_mass_loss([probs], classes, masks, torch.tensor([True]), 0.5).item() == \
        pytest.approx(expected, abs=1e-6)
    assert grounding.pixel_mass_loss([probs], classes, masks, torch.tensor([False]), 0.5).item() == 0.0


def test_pooled_masks_are_area_fractions():
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    masks[0, :4, :4] = 2  # the top-left quarter is class 2
    grid = grounding.pooled_masks(masks, n_classes=3, size=2)
    assert grid.shape == (1, 4, 2, 2)
    assert grid[0, 2].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert torch.allclose(grid.sum(1), torch.ones(1, 2, 2))


def _maps_with_token_attention(inside: float, side: int = 4):
    """One image, 3 text positions; position 1 is class 1, whose mask is the left half of the grid."""
    q = side * side
    left = torch.zeros(side, side)
    left[:, : side // 2] = 1
    masks = torch.stack([1 - left, left])[None]  # (1, 2, side, side): background, class 1
    probs = torch.full((1, q, 3), 0.3)
    flat = left.flatten()
    probs[0, :, 1] = torch.where(flat > 0, inside, 1 - inside) * 0.2
    token_classes = torch.tensor([[0, 1, 0]])
    return probs, token_classes, masks


@pytest.mark.parametrize("inside, expected", [(1.0, 0.0), (0.0, 1.0), (0.75, 0.0625)])
def test_grounding_loss_is_the_squared_share_outside_the_mask(inside, expected):
    probs, token_classes, masks = _maps_with_token_attention(inside)
    loss = grounding.grounding_loss([probs], token_classes, masks, torch.tensor([True]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # a coarser layer sees the mask pooled to its own grid
    coarse = probs.view(1, 4, 4, 3)[:, ::2, ::2].reshape(1, 4, 3)
    both = grounding.grounding_loss([probs, coarse], token_classes, masks, torch.tensor([True]))
    assert both.item() == pytest.approx(expected, abs=1e-6)


def test_grounding_loss_skips_unsupervised_timesteps_and_captions_without_class_words():
    probs, token_classes, masks = _maps_with_token_attention(0.0)
    probs.requires_grad_(True)
    off = grounding.grounding_loss([probs], token_classes, masks, torch.tensor([False]))
    assert off.item() == 0.0 and off.requires_grad
    none = grounding.grounding_loss([probs], torch.zeros_like(token_classes), masks, torch.tensor([True]))
    assert none.item() == 0.0


def test_probe_records_each_cross_layer_with_gradients_and_restores_processors():
    cfg = tiny()
    unet = train.build_unet(cfg)
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    x = torch.randn(2, 4, 16, 16)
    ctx = torch.randn(2, cfg.text_max_length, cfg.text_hidden)
    t = torch.tensor([10, 500])
    plain = unet(x, t, encoder_hidden_states=ctx).sample
    with grounding.probe_cross_attention(unet) as maps:
        probed = unet(x, t, encoder_hidden_states=ctx).sample
    n_cross = sum(1 for n, _ in unet.named_modules() if n.endswith("attn2"))
    assert len(maps) == n_cross > 0
    assert torch.equal(plain, probed)  # the layer outputs come from the original processors
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert all(m.requires_grad for m in maps)
    assert all(torch.allclose(m.sum(-1), torch.ones(()), atol=1e-5) for m in maps)
    # the first map equals the explicit softmax of that layer's own projections
    first = next(mod for n, mod in unet.named_modules() if n.endswith("attn2"))
    captured = {}
    hook = first.register_forward_pre_hook(lambda m, args, kw: captured.update(h=args[0] if args else kw["hidden_states"]),
                                           with_kwargs=True)
    unet(x, t, encoder_hidden_states=ctx)
    hook.remove()
    assert torch.allclose(maps[0], attention_probs(first, captured["h"], ctx), atol=1e-6)
    # and the loss sends gradients to the query/key projections
    loss = grounding.grounding_loss(maps, torch.tensor([[0, 1] + [0] * (cfg.text_max_length - 2)] * 2),
                                    grounding.pooled_masks(torch.randint(0, 11, (2, 64, 64)), 10, 16),
                                    torch.tensor([True, True]))
    loss.backward()
    assert first.to_q.weight.grad is not None and first.to_q.weight.grad.abs().sum() > 0


def test_grounded_training_logs_both_losses_and_exports_plain_processors(tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = tiny(unet_steps=2, ckpt_every=2, grounding_weight=0.5, grounding_max_t=1000, grounding_pixel_mass=0.5)
    data = train.load_training_set(cfg, masks=True)
    assert data[2].shape == (cfg.n_train, 64, 64) and data[2].max() <= len(CLASS_NAMES)
    out = tmp_path / "run"
    train.train_vae(cfg, out, data=data)
    folder = train.train_unet(cfg, out, data=data[:2])  # renders the masks itself when not given
    records = list(read_jsonl(out / "unet" / "loss.jsonl"))
    assert len(records) == 2
    for r in records:
        assert 0.0 <= r["grounding"] <= 1.0 + 0.5 ** 2  # share term <= 1, pixel-mass term <= target ** 2
        assert r["loss"] == pytest.approx(r["denoise"] + 0.5 * r["grounding"], rel=1e-5)
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    assert not any(isinstance(p, grounding.GroundingProbe) for p in pipe.unet.attn_processors.values())
    for bad in ({"grounding_weight": -1.0}, {"grounding_weight": 1.0, "grounding_max_t": 0},
                {"grounding_pixel_mass": 1.5}):
        with pytest.raises(ConfigError):
            train.train_unet(tiny(**bad), out, data=data)
