"""A toy CLIP for the shapes world: a real open_clip model, trained here contrastively.

CLIP score on the toy world must be a real open_clip computation, yet no pretrained CLIP can be
downloaded; so the architecture is an ordinary open_clip config (tiny ViT image tower + tiny text
tower with open_clip's own CLIP-BPE tokenizer), registered with ``open_clip.add_model_config`` and
trained on toy images and captions. Each image is contrasted with the other captions of the batch
and with two *hard negatives* of its own caption: one with a colour changed or swapped between
objects, one with a shape changed or swapped. That is what makes it usable for attribute-binding
evaluation: :func:`eval_swap_accuracy` measures how often the true caption beats both.

Shipped files (``t2ialign/assets/toy_clip/``): ``<arch name>.json`` (the open_clip model config),
``toy_clip.safetensors`` (fp16 weights) and ``t2ialign_toy_clip.json`` (training record, accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from t2ialign.core.errors import ConfigError, ModelLoadError
from t2ialign.core.fileio import atomic_write_json
from t2ialign.plugins.toy.dataset import ToyShapes
from t2ialign.plugins.toy.world import COLOURS, CLASS_NAMES, WorldConfig, join_phrases, object_phrase
from t2ialign.plugins.toy.train import _progress, _train_loop, load_checkpoint

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "toy_clip"
WEIGHTS = "toy_clip.safetensors"
RECORD = "t2ialign_toy_clip.json"


@dataclass
class ToyClipConfig:
    """Architecture and training knobs of the toy CLIP."""

    arch_name: str = "t2ialign-toy-clip"
    embed_dim: int = 64
    image_size: int = 64
    #: "resnet" (open_clip's ModifiedResNet) or "vit"; a ViT (patch 8, width 96, 3 layers) trained
    #: 1300 steps stayed at ~73% on shape swaps, the small conv tower learns shapes far faster
    vision_tower: str = "resnet"
    vision_width: int = 16
    vision_layers: int = 1  # resnet: bottleneck blocks per stage (4 stages); vit: transformer layers
    patch_size: int = 8  # vit only
    vision_head_width: int = 32  # vit only
    text_width: int = 64
    text_heads: int = 4
    text_layers: int = 3
    context_length: int = 32  # toy captions are at most ~25 BPE tokens
    seed: int = 0
    n_train: int = 10000
    steps: int = 2500
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    log_every: int = 10
    ckpt_every: int = 100
    threads: int = 2
    eval_images: int = 500

    @classmethod
    def tiny(cls) -> "ToyClipConfig":
        return cls(arch_name="t2ialign-toy-clip-tiny", embed_dim=16, vision_width=8, vision_layers=1, text_width=32, text_heads=2, text_layers=1, n_train=64, steps=4,
                   batch=8, warmup=2, log_every=1, ckpt_every=2, eval_images=8)

    def arch(self) -> dict[str, Any]:
        """The open_clip model config (the JSON shipped next to the weights)."""
        if self.vision_tower == "resnet":
            # a list of layers makes open_clip build its ModifiedResNet (attention-pooled at /32)
            vision = {"image_size": self.image_size, "layers": [self.vision_layers] * 4, "width": self.vision_width,
                      "patch_size": None}
        elif self.vision_tower == "vit":
            vision = {"image_size": self.image_size, "layers": self.vision_layers, "width": self.vision_width,
                      "head_width": self.vision_head_width, "patch_size": self.patch_size}
        else:
            raise ConfigError(f"unknown vision_tower '{self.vision_tower}'", where="toy CLIP config",
                              fix="use 'resnet' or 'vit'")
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": vision,
            "text_cfg": {"context_length": self.context_length, "vocab_size": 49408, "width": self.text_width,
                         "heads": self.text_heads, "layers": self.text_layers},
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ToyClipConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown toy CLIP options {unknown}", where="train-toy --stage clip",
                              fix=f"use only {sorted(known)}")
        return cls(**data)


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------
def register_arch(cfg: ToyClipConfig, folder: Path) -> Path:
    """Write ``folder/<arch_name>.json`` and register it with open_clip under ``arch_name``."""
    import open_clip

    path = Path(folder) / f"{cfg.arch_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or json.loads(path.read_text()) != cfg.arch():
        atomic_write_json(path, cfg.arch())
    open_clip.add_model_config(path)
    return path


def build_clip(cfg: ToyClipConfig, folder: Path):
    """A randomly initialised model of the registered arch, its eval transform and tokenizer."""
    import open_clip

    register_arch(cfg, folder)
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.arch_name, pretrained=None)
    return model, preprocess, open_clip.get_tokenizer(cfg.arch_name)


def load_toy_clip(folder: str | Path | None = None, device: str = "cpu"):
    """``(model, preprocess, tokenizer)`` of the shipped (or given) toy CLIP, in eval mode.

    ``preprocess`` maps a PIL image to the normalised tensor the model expects; ``tokenizer`` maps
    a list of strings to token ids. Raises :class:`ModelLoadError` when the folder has no weights.
    """
    import open_clip

    folder = Path(folder) if folder is not None else ASSET_DIR
    configs = sorted(p for p in folder.glob("*.json") if p.name != RECORD) if folder.is_dir() else []
    weights = folder / WEIGHTS
    if not configs or not weights.exists():
        raise ModelLoadError(f"no toy CLIP (open_clip config JSON + {WEIGHTS}) in {folder}", where=str(folder),
                             fix="train it with 't2ialign train-toy --stage clip'")
    open_clip.add_model_config(configs[0])
    name = configs[0].stem
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights), device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


def _normaliser(model) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.visual.preprocess_cfg
    return torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)


def images_to_input(model, images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` at the model's size -> normalised ``(N, 3, H, W)``.

    Equal to open_clip's eval transform for images already at ``image_size`` (its resize and crop
    are identities then), but batched.
    """
    mean, std = _normaliser(model)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std


# ------------------------------------------------------------------------------------------------
# captions and hard negatives
# ------------------------------------------------------------------------------------------------
def full_caption(objects: list[dict[str, Any]]) -> str:
    return "a photo of " + join_phrases([object_phrase(o) for o in objects])


def _key(objects: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((o["colour"], o["shape"]) for o in objects)


def swap_negative(objects: list[dict[str, Any]], attribute: str, rng: np.random.Generator) -> list[dict[str, Any]]:
    """A copy of ``objects`` whose caption is wrong in ``attribute`` (``"colour"`` or ``"shape"``).

    With two or more objects, half the time the attribute is swapped between two objects (a
    binding error: same words, wrong pairing); otherwise one object's value is replaced. The
    result always differs from the scene as a set of (colour, shape) pairs.
    """
    values = list(COLOURS) if attribute == "colour" else CLASS_NAMES
    out = [dict(o) for o in objects]
    if len(out) >= 2 and rng.random() < 0.5:
        i, j = rng.choice(len(out), size=2, replace=False)
        if out[i][attribute] != out[j][attribute]:
            out[i][attribute], out[j][attribute] = out[j][attribute], out[i][attribute]
            if _key(out) != _key(objects):
                return out
            out = [dict(o) for o in objects]
    i = int(rng.integers(len(out)))
    out[i][attribute] = str(rng.choice([v for v in values if v != out[i][attribute]]))
    return out


# ------------------------------------------------------------------------------------------------
# training and evaluation
# ------------------------------------------------------------------------------------------------
def _render(split: str, n: int, seed: int, progress: bool) -> tuple[np.ndarray, list[list[dict[str, Any]]]]:
    world = ToyShapes(split, n, WorldConfig(seed=seed))
    images = np.empty((n, 64, 64, 3), dtype=np.uint8)
    objects = []
    for i in _progress(range(n), progress, f"render {split}"):
        sample = world[i]
        images[i] = sample.image
        objects.append(sample.meta["objects"])
    return images, objects


def train_clip(cfg: ToyClipConfig, out: Path, export: Path | None = None, progress: bool = False) -> Path:
    """Train (or resume) the toy CLIP in ``out/clip``; save it to ``out/clip/final`` and ``export``."""
    from safetensors.torch import save_file

    from t2ialign.plugins.toy.train import ToyTrainConfig

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + 2)
    out = Path(out)
    model, _, tokenizer = build_clip(cfg, out / "clip")
    images, objects = _render("train", cfg.n_train, cfg.seed, progress)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)

    def step_fn(step: int) -> dict[str, float]:
        seq = np.random.SeedSequence([cfg.seed, 3000, step])
        rng = np.random.default_rng(seq)
        idx = rng.integers(len(images), size=cfg.batch)
        x = images_to_input(model, images[idx])
        if rng.random() < 0.5:  # captions say nothing about left/right
            x = x.flip(-1)
        pos, neg = [], []
        for i in idx:
            objs = list(objects[i])
            if rng.random() < 0.5:
                objs = [objs[k] for k in rng.permutation(len(objs))]
            pos.append(full_caption(objs))
            neg += [full_caption(swap_negative(objs, "colour", rng)), full_caption(swap_negative(objs, "shape", rng))]
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(tokenizer(pos + neg), normalize=True)
        scale = model.logit_scale.exp().clamp(max=100)
        labels = torch.arange(cfg.batch)
        # images choose among all captions of the batch incl. every hard negative; captions among images
        loss_i = F.cross_entropy(scale * img @ txt.T, labels)
        loss_t = F.cross_entropy(scale * txt[: cfg.batch] @ img.T, labels)
        loss = 0.5 * (loss_i + loss_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return {"loss": loss.item(), "scale": scale.item()}

    # the shared loop only needs these fields of a training config
    loop_cfg = ToyTrainConfig(seed=cfg.seed, warmup=cfg.warmup, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every)
    final = _train_loop(stage="clip", out=out, total_steps=cfg.steps, modules={"clip": model}, optimizer=opt,
                        base_lrs=[cfg.lr], step_fn=step_fn, cfg=loop_cfg, progress=progress)
    if "models" in final:
        model.load_state_dict(final["models"]["clip"])
    target = out / "clip" / "final"
    tmp = out / "clip" / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    register_arch(cfg, tmp)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
    ckpt = load_checkpoint(out / "clip" / "ckpt.pt") or {}
    atomic_write_json(tmp / RECORD, {"config": cfg.to_dict(), "steps": cfg.steps, "wall_s": ckpt.get("elapsed"),
                                     "params": sum(p.numel() for p in model.parameters())})
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    result = target
    if export is not None:
        shutil.rmtree(export, ignore_errors=True)
        shutil.copytree(target, export)
        result = Path(export)
    return result


@torch.no_grad()
def eval_swap_accuracy(folder: str | Path | None = None, n: int = 500, seed: int = 0,
                       write_record: bool = True) -> dict[str, Any]:
    """How often the toy CLIP prefers the true caption of a *test* image over swapped ones.

    For each of the first ``n`` test-split images: one colour-swapped and one shape-swapped
    caption (fixed seed). Returns accuracies vs each and vs both, and the mean CLIP score
    (``100 * cos``) of true captions. Written into the folder's record file when asked.
    """
    model, _, tokenizer = load_toy_clip(folder)
    images, objects = _render("test", n, seed, False)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4000]))
    wins_c = wins_s = wins_both = 0
    scores = []
    t0 = time.time()
    for start in range(0, n, 100):
        sl = slice(start, min(n, start + 100))
        img = model.encode_image(images_to_input(model, images[sl]), normalize=True)
        for row, objs in enumerate(objects[sl]):
            caps = [full_caption(objs), full_caption(swap_negative(objs, "colour", rng)),
                    full_caption(swap_negative(objs, "shape", rng))]
            sim = (model.encode_text(tokenizer(caps), normalize=True) @ img[row]).tolist()
            wins_c += sim[0] > sim[1]
            wins_s += sim[0] > sim[2]
            wins_both += sim[0] > max(sim[1], sim[2])
            scores.append(100 * sim[0])
    result = {"n_images": n, "acc_vs_colour_swap": wins_c / n, "acc_vs_shape_swap": wins_s / n,
              "acc_vs_both": wins_both / n, "mean_clip_score_true": float(np.mean(scores)),
              "eval_s": round(time.time() - t0, 1)}
    record_dir = Path(folder) if folder is not None else ASSET_DIR
    if write_record and (record_dir / RECORD).exists():
        record = json.loads((record_dir / RECORD).read_text())
        record["swap_test"] = result
        atomic_write_json(record_dir / RECORD, record)
    return result


__all__ = ["ToyClipConfig", "build_clip", "eval_swap_accuracy", "load_toy_clip", "swap_negative", "train_clip"]
