"""Tests of the toy CLIP: the custom open_clip config builds, trains a few steps, saves and reloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from t2ialign.core.cli import main
from t2ialign.core.errors import ConfigError, ModelLoadError
from t2ialign.plugins.toy.dataset import make_toy_shapes
from t2ialign.plugins.toy import clip


def test_custom_config_registers_with_open_clip(tmp_path):
    import open_clip

    cfg = clip.ToyClipConfig.tiny()
    model, preprocess, tokenizer = clip.build_clip(cfg, tmp_path)
    assert cfg.arch_name in open_clip.list_models()
    assert json.loads((tmp_path / f"{cfg.arch_name}.json").read_text()) == cfg.arch()
    tokens = tokenizer(["a photo of a red circle"])
    assert tokens.shape == (1, cfg.context_length)
    assert tokens[0, 0].item() == 49406  # open_clip's own CLIP BPE: <start_of_text>
    from PIL import Image

    x = preprocess(Image.fromarray(make_toy_shapes({}, "val")[0].image))
    assert x.shape == (3, 64, 64)
    # the batched tensor path equals open_clip's own eval transform for 64x64 images
    batched = clip.images_to_input(model, make_toy_shapes({}, "val")[0].image[None])
    assert torch.allclose(batched[0], x, atol=0.05)
    with torch.no_grad():
        assert model.encode_image(x[None]).shape == (1, cfg.embed_dim)


def test_swap_negatives_always_change_the_scene():
    ds = make_toy_shapes({}, "train")
    rng = np.random.default_rng(0)
    for i in range(100):
        objs = ds[i].meta["objects"]
        for attribute in ("colour", "shape"):
            neg = clip.swap_negative(objs, attribute, rng)
            other = "shape" if attribute == "colour" else "colour"
            assert clip.full_caption(neg) != clip.full_caption(objs)
            assert [o[other] for o in neg] == [o[other] for o in objs]  # only the named attribute changed
            assert sorted((o["colour"], o["shape"]) for o in neg) != sorted((o["colour"], o["shape"]) for o in objs)


def test_a_few_training_steps_then_save_load_and_evaluate(tmp_path):
    cfg = clip.ToyClipConfig.from_dict({**clip.ToyClipConfig.tiny().to_dict(), "steps": 6, "threads": 1})
    folder = clip.train_clip(cfg, tmp_path / "run", tmp_path / "export")
    log = [json.loads(line) for line in (tmp_path / "run" / "clip" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) for r in log)
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{cfg.arch_name}.json", clip.RECORD, clip.WEIGHTS])

    model, _, tokenizer = clip.load_toy_clip(folder)
    state = torch.load(tmp_path / "run" / "clip" / "ckpt.pt", weights_only=False)["models"]["clip"]
    trained = state["text_projection"]
    assert torch.allclose(model.state_dict()["text_projection"], trained.half().float())
    result = clip.eval_swap_accuracy(folder, n=6, seed=0)
    for key in ("acc_vs_colour_swap", "acc_vs_shape_swap", "acc_vs_both"):
        assert 0.0 <= result[key] <= 1.0
    assert result["acc_vs_both"] <= min(result["acc_vs_colour_swap"], result["acc_vs_shape_swap"])
    assert json.loads((folder / clip.RECORD).read_text())["swap_test"] == result


def test_missing_weights_and_bad_options_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="train-toy --stage clip"):
        clip.load_toy_clip(tmp_path)
    with pytest.raises(ConfigError, match="batchsize"):
        clip.ToyClipConfig.from_dict({"batchsize": 3})
    assert main(["train-toy", "--stage", "all", "--set", "nonsense=1", "--output", str(tmp_path)]) == 2


def test_both_vision_towers_build(tmp_path):
    base = clip.ToyClipConfig.tiny().to_dict()
    vit = clip.ToyClipConfig.from_dict({**base, "arch_name": "t2ialign-toy-clip-tiny-vit", "vision_tower": "vit",
                                        "vision_width": 32, "vision_head_width": 16})
    for cfg in (clip.ToyClipConfig.tiny(), vit):
        model, _, _ = clip.build_clip(cfg, tmp_path)
        with torch.no_grad():
            assert model.encode_image(torch.zeros(2, 3, 64, 64)).shape == (2, cfg.embed_dim)
    assert type(clip.build_clip(vit, tmp_path)[0].visual).__name__ == "VisionTransformer"
    with pytest.raises(ConfigError, match="vision_tower"):
        clip.ToyClipConfig(vision_tower="convnext").arch()
