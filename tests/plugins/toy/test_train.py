"""Tests of the toy model training: real diffusers/transformers models, tiny sizes, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from t2ialign.core.cli import main
from t2ialign.core.errors import ConfigError, InputError
from t2ialign.core.fileio import read_jsonl
from t2ialign.plugins.toy.dataset import make_toy_shapes
from t2ialign.plugins.toy.world import CLASS_NAMES, COLOURS
from t2ialign.plugins.toy import train
from tests.helpers.toy_configs import tiny


def _fixed_batch(cfg, n=4):
    images, objects = train.load_training_set(cfg)
    return train.to_tensor(images[:n]), objects[:n]


def test_vae_loss_is_finite_and_decreases_on_a_fixed_batch():
    cfg = tiny()
    x, _ = _fixed_batch(cfg)
    vae = train.build_vae(cfg)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        recon = vae(x, sample_posterior=False).sample
        loss = F.mse_loss(recon, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    assert vae.encode(x).latent_dist.mean.shape == (4, 4, 16, 16)  # f = 4, 4 channels


def test_text_encoder_and_unet_learn_jointly_on_a_fixed_batch():
    cfg = tiny()
    _, objects = _fixed_batch(cfg)
    tok = train.build_tokenizer()
    te, unet = train.build_text_encoder(cfg), train.build_unet(cfg)
    gen = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(4, 4, 16, 16, generator=gen), torch.randn(4, 4, 16, 16, generator=gen)
    t = torch.tensor([50, 300, 600, 900])
    a = train.build_scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    ids = tok([train.augment_caption(o, np.random.default_rng(0), 0.0) for o in objects],
              padding="max_length", max_length=cfg.text_max_length, return_tensors="pt").input_ids
    opt = torch.optim.Adam(list(te.parameters()) + list(unet.parameters()), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(unet(z_t, t, encoder_hidden_states=te(ids)[0]).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert te.embeddings.token_embedding.weight.grad.abs().sum() > 0  # the text tower is trained too


def test_unet_has_cross_attention_at_two_resolutions():
    cfg = tiny()
    unet = train.build_unet(cfg)
    seen: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, args[0].shape[1]))
             for name, m in unet.named_modules() if name.endswith("attn2")]
    with torch.no_grad():
        unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 77, cfg.text_hidden))
    for h in hooks:
        h.remove()
    assert set(seen.values()) == {16 * 16, 8 * 8}  # image tokens per cross-attention call
    up16 = [n for n, tokens in seen.items() if n.startswith("up_blocks") and tokens == 256]
    assert len(up16) == cfg.unet_layers_per_block + 1


def test_augmented_captions_cover_the_method_prompt_forms():
    sample = make_toy_shapes({"min_objects": 3, "max_objects": 3}, "train")[0]
    objects = sample.meta["objects"]
    rng = np.random.default_rng(0)
    caps = [train.augment_caption(objects, rng, 0.1) for _ in range(600)]
    assert 0.05 < np.mean([c == "" for c in caps]) < 0.15
    assert sample.prompt in caps  # the full caption
    shapes = [o["shape"] for o in objects]
    class_list = "a photo of " + ", ".join(sorted(set(shapes), key=CLASS_NAMES.index))
    assert class_list in caps  # the segmentation prompt form
    assert any(c == f"a photo of {s}" for c in caps for s in shapes)  # the per-class ELBO prompt form
    vocab = {"a", "an", "photo", "of", "and", "small", *COLOURS, *CLASS_NAMES}
    for c in caps:
        assert set(c.replace(",", "").split()) <= vocab
        assert all(w not in c.split() for w in CLASS_NAMES if w not in shapes)


def test_config_overrides_are_checked():
    with pytest.raises(ConfigError, match="unet_stepz"):
        train.ToyTrainConfig.from_dict({"unet_stepz": 3})
    with pytest.raises(InputError, match="no trained VAE"):
        train.train_unet(tiny(), Path("/nonexistent-t2ialign-out"))


def test_resume_continues_exactly_where_the_checkpoint_left(tmp_path, monkeypatch):
    cfg = tiny(vae_steps=4, ckpt_every=2)
    data = train.load_training_set(cfg)
    straight = tmp_path / "straight"
    train.train_vae(cfg, straight, data=data)
    ref = {r["step"]: r["loss"] for r in read_jsonl(straight / "vae" / "loss.jsonl")}
    assert sorted(ref) == [1, 2, 3, 4]

    # kill the second run while it logs step 3 (after the step-2 checkpoint was written)
    killed = tmp_path / "killed"
    real_append = train.append_jsonl

    def dying_append(path, record):
        if record["step"] == 3:
            raise KeyboardInterrupt
        real_append(path, record)

    monkeypatch.setattr(train, "append_jsonl", dying_append)
    with pytest.raises(KeyboardInterrupt):
        train.train_vae(cfg, killed, data=data)
    assert torch.load(killed / "vae" / "ckpt.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(train, "append_jsonl", real_append)

    train.train_vae(cfg, killed, data=data)
    resumed = list(read_jsonl(killed / "vae" / "loss.jsonl"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for r in resumed:
        assert r["loss"] == pytest.approx(ref[r["step"]], rel=1e-5)
    assert torch.load(killed / "vae" / "ckpt.pt", weights_only=False)["step"] == 4


def test_a_second_copy_of_a_running_stage_is_refused(tmp_path):
    from t2ialign.core.errors import RunLockedError
    from t2ialign.core.fileio import OutputLock

    (tmp_path / "vae").mkdir()
    with OutputLock(tmp_path / "vae"):
        with pytest.raises(RunLockedError):
            train.train_vae(tiny(), tmp_path)
    assert not (tmp_path / "vae" / "ckpt.pt").exists()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    rc = main(["train-toy", "--stage", "model", "--preset", "tiny", "--set", "threads=1", "--output", str(out / "run"),
               "--export", str(out / "assets"), "--no-progress"])
    assert rc == 0
    return out


def test_cli_trains_and_exports_a_loadable_pipeline(cli_run):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    folder = cli_run / "assets" / "toy"
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.safety_checker is None
    assert pipe.tokenizer("a photo of a red circle").input_ids[:2] == [49406, 320]
    stats = json.loads((cli_run / "run" / "vae" / "final" / "t2ialign_vae_stats.json").read_text())
    assert pipe.vae.config.scaling_factor == pytest.approx(stats["scaling_factor"])
    assert pipe.vae.config.scaling_factor != AutoencoderKL().config.scaling_factor  # measured, not the default
    image = pipe("a photo of a red circle", num_inference_steps=2, guidance_scale=2.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    record = json.loads((folder / "t2ialign_toy.json").read_text())
    assert record["class_names"][0] == "background" and record["training"]["unet"]["steps"] == 4


def test_sample_grid_writes_one_tile_per_prompt(cli_run, tmp_path):
    from PIL import Image

    png = train.sample_grid(cli_run / "assets" / "toy", tmp_path / "grid.png", ["a photo of circle", ""], steps=2)
    assert Image.open(png).size == (2 * 64, 64)


def test_cli_rerun_resumes_instead_of_restarting(cli_run):
    log = cli_run / "run" / "unet" / "loss.jsonl"
    vae_config = cli_run / "run" / "vae" / "final" / "config.json"
    before, vae_before = list(read_jsonl(log)), vae_config.read_text()
    mtime = vae_config.stat().st_mtime_ns
    rc = main(["train-toy", "--stage", "model", "--preset", "tiny", "--set", "threads=1", "--set", "unet_steps=6",
               "--output", str(cli_run / "run"), "--no-export", "--no-progress"])
    assert rc == 0
    after = list(read_jsonl(log))
    assert after[: len(before)] == before
    assert [r["step"] for r in after[len(before):]] == [5, 6]
    # the finished VAE stage is kept as is: the UNet goes on with the scaling factor it was trained with
    assert vae_config.stat().st_mtime_ns == mtime and vae_config.read_text() == vae_before


def test_export_holds_the_ema_weights_and_old_checkpoints_gain_an_ema(tmp_path):
    """The exported UNet is the moving average saved in the checkpoint, not the last raw step;
    a checkpoint written before EMA existed resumes and starts its average from its weights."""
    from diffusers import UNet2DConditionModel

    cfg = tiny(unet_steps=2, ckpt_every=2, ema_decay=0.999)
    data = train.load_training_set(cfg)
    out = tmp_path / "run"
    train.train_vae(cfg, out, data=data)
    train.train_unet(cfg, out, data=data)
    ckpt_path = out / "unet" / "ckpt.pt"
    state = torch.load(ckpt_path, weights_only=False)
    # make it look like a pre-EMA checkpoint
    del state["extras"]
    torch.save(state, ckpt_path)

    longer = tiny(unet_steps=4, ckpt_every=2, ema_decay=0.999)
    train.train_unet(longer, out, data=data)
    state = torch.load(ckpt_path, weights_only=False)
    ema = state["extras"]["ema"]
    assert state["step"] == 4 and ema["optimization_step"] == 2
    exported = UNet2DConditionModel.from_pretrained(out / "pipeline" / "unet")
    n_unet = len(list(exported.parameters()))
    for p_exp, shadow, raw in zip(exported.parameters(), ema["shadow_params"][:n_unet],
                                  state["models"]["unet"].values()):
        assert torch.allclose(p_exp, shadow.to(p_exp.dtype), atol=1e-6)
    raw_params = [v for k, v in state["models"]["unet"].items()]
    differs = any(not torch.allclose(s, r) for s, r in zip(ema["shadow_params"][:n_unet],
                                                           [p for p in raw_params if p.is_floating_point()]))
    assert differs, "the EMA should lag behind the raw weights"

    # ema_decay=0 (the default) turns it off: the export equals the raw weights
    off = tiny(unet_steps=2, ckpt_every=2)
    assert off.ema_decay == 0.0
    out2 = tmp_path / "off"
    train.train_vae(off, out2, data=data)
    train.train_unet(off, out2, data=data)
    state2 = torch.load(out2 / "unet" / "ckpt.pt", weights_only=False)
    assert state2["extras"] == {}
    exported2 = UNet2DConditionModel.from_pretrained(out2 / "pipeline" / "unet")
    for name, p_exp in exported2.state_dict().items():
        assert torch.allclose(p_exp, state2["models"]["unet"][name], atol=1e-6)


def test_cli_rejects_malformed_overrides(tmp_path, capsys):
    rc = main(["train-toy", "--stage", "vae", "--set", "vae_steps", "--output", str(tmp_path), "--no-progress"])
    assert rc == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_short_text_context_and_faster_query_key_rate_reach_the_export(tmp_path):
    """``text_max_length`` shortens the tokenizer and the encoder's position table, so the saved
    pipeline pads to it; ``cross_qk_lr_mult`` gives exactly the cross-attention q/k their own rate."""
    from diffusers import StableDiffusionPipeline

    cfg = tiny(unet_steps=2, ckpt_every=2, text_max_length=16, cross_qk_lr_mult=3.0)
    data = train.load_training_set(cfg)
    out = tmp_path / "run"
    train.train_vae(cfg, out, data=data)
    folder = train.train_unet(cfg, out, data=data)
    state = torch.load(out / "unet" / "ckpt.pt", weights_only=False)
    groups = state["optimizer"]["param_groups"]
    assert len(groups) == 3 and groups[2]["lr"] == pytest.approx(3.0 * groups[0]["lr"])
    unet = train.build_unet(cfg)
    qk = [n for n, _ in unet.named_parameters() if ".attn2.to_q." in n or ".attn2.to_k." in n]
    assert len(groups[2]["params"]) == len(qk) > 0
    assert len(groups[0]["params"]) == len(list(unet.parameters())) - len(qk)

    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    assert pipe.tokenizer.model_max_length == 16
    assert pipe.text_encoder.config.max_position_embeddings == 16
    image = pipe("a photo of a red circle", num_inference_steps=2, guidance_scale=2.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    for bad in ({"text_max_length": 4}, {"text_max_length": 78}, {"cross_qk_lr_mult": 0.0}):
        with pytest.raises(ConfigError):
            train.train_unet(tiny(**bad), out, data=data)
