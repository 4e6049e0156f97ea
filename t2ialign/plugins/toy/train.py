"""Train the built-in toy text-to-image model on the shapes world, from scratch, on CPU.

The result is a real Stable-Diffusion-layout model (``AutoencoderKL`` + ``CLIPTextModel`` with SD's
CLIP BPE tokenizer + ``UNet2DConditionModel`` + DDIM scheduler) saved as a
``StableDiffusionPipeline`` folder, so every SD code path of the toolkit runs on it unchanged.

Stages (each resumable; re-running with the same ``output`` continues from its last checkpoint):

1. ``vae``: the autoencoder (64x64x3 -> 16x16x4, f = 4), L1 + MSE reconstruction + a small KL.
   Afterwards ``scaling_factor = 1 / std(latents)`` is measured on training images and written
   into the VAE config, as SD's 0.18215 was.
2. ``unet``: text encoder and UNet trained jointly with the epsilon objective on cached VAE
   posteriors (a fresh posterior sample every step), plus a token-level grounding loss on the
   class words' cross-attention (:mod:`t2ialign.plugins.toy.grounding`; ``grounding_weight=0``
   turns it off). Captions are augmented so that every prompt form the method uses is
   in-distribution (see :func:`augment_caption`); 10% are empty for classifier-free guidance. At
   the end the pipeline is exported (``export/toy``).

Layout of ``output``: ``<stage>/ckpt.pt`` (atomic), ``<stage>/loss.jsonl``, ``vae/final/``
(the trained VAE), ``latents.pt`` (cached posteriors) and ``pipeline/`` (the export).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from t2ialign.core.errors import ConfigError, InputError, NumericalError
from t2ialign.core.fileio import OutputLock, append_jsonl, atomic_write_bytes, atomic_write_json, read_jsonl
from t2ialign.plugins.toy import grounding
from t2ialign.plugins.toy.dataset import ToyShapes
from t2ialign.plugins.toy.world import CLASS_NAMES, COLOURS, WorldConfig, join_phrases, object_phrase

#: where the shipped artefacts live inside the package
ASSETS = Path(__file__).resolve().parents[2] / "assets"


@dataclass
class ToyTrainConfig:
    """Every knob of a toy training run (the shipped run uses :meth:`full`)."""

    seed: int = 0
    n_train: int = 10000
    image_size: int = 64
    threads: int = 2
    # ---- stage 1: VAE
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_groups: int = 8
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # ---- stage 2: text encoder + UNet
    text_hidden: int = 64
    #: 0 = the caption's token embeddings (+ positions, final layer norm) reach the UNet directly:
    #: no causal layer mixes a word with the words before it, so a word's context vector is that
    #: word (the shipped model; with 3 layers colour edits took far less often, docs/toy.md)
    text_layers: int = 0
    text_heads: int = 4
    #: text context length (tokenizer ``model_max_length`` and the encoder's position table). 77 is
    #: SD's; toy captions need <= 26 tokens, and at 77 the causal text encoder's ~50 padding
    #: positions each carry a summary of the whole caption that the UNet's cross-attention learned
    #: to read as a near-uniform average instead of attending to the word. A shorter context alone
    #: did not fix that; ``text_layers=0`` (no caption summary at all) helped more (docs/toy.md).
    #: 32 holds every toy caption
    text_max_length: int = 32
    unet_channels: tuple[int, ...] = (64, 128)
    unet_heads: tuple[int, ...] = (4, 8)
    unet_layers_per_block: int = 1
    unet_groups: int = 32
    unet_steps: int = 3600
    unet_batch: int = 32
    unet_lr: float = 6e-4
    text_lr: float = 6e-4
    #: learning-rate multiplier for the cross-attention query/key projections (``attn2.to_q/to_k``):
    #: these alone decide where a word's attention lands, and at the base rate they stayed near
    #: uniform (docs/toy.md)
    cross_qk_lr_mult: float = 3.0
    empty_caption_prob: float = 0.1
    #: exponential moving average of the UNet + text-encoder weights, exported instead of the raw
    #: weights when > 0 (e.g. 0.999). Off by default: the shipped model was trained without it, and
    #: a 1200-step EMA continuation of it did not segment better (docs/toy.md)
    ema_decay: float = 0.0
    #: weight of the token-level grounding loss (:mod:`t2ialign.plugins.toy.grounding`) added to the
    #: denoising loss, only at timesteps ``< grounding_max_t``; 0 = plain denoising training. Without
    #: it the cross-attention of a CPU-budget model stays near uniform (~30% attention-only mIoU);
    #: with 0.1 the denoising loss follows the same curve (docs/toy.md)
    grounding_weight: float = 0.1
    grounding_max_t: int = 500
    #: also ground the colour words: each colour word's attention is supervised to fall inside the
    #: object it describes (the class of the next class word of the caption). Grounding the class
    #: words alone left colours loosely bound to shapes (a colour edit took in 4 of 16 held-out
    #: scenes even with the true object as blend mask; docs/toy.md)
    ground_colours: bool = True
    #: target of the pixel-mass term (:func:`grounding.pixel_mass_loss`): the share of an object
    #: pixel's attention that should go to the object's own words (0 = term off). Added to the
    #: grounding loss with the same weight and timesteps
    grounding_pixel_mass: float = 0.5
    # ---- bookkeeping
    warmup: int = 100
    log_every: int = 10
    ckpt_every: int = 200
    fp16_export: bool = True

    @classmethod
    def full(cls) -> "ToyTrainConfig":
        """The configuration of the shipped model."""
        return cls()

    @classmethod
    def tiny(cls) -> "ToyTrainConfig":
        """A seconds-sized configuration for tests and smoke runs."""
        return cls(n_train=64, vae_channels=(8, 16, 16), vae_groups=4, vae_steps=4, vae_batch=4,
                   text_hidden=32, text_layers=1, text_heads=2, unet_channels=(32, 32), unet_heads=(2, 2),
                   unet_groups=8, unet_steps=4, unet_batch=4, warmup=2, log_every=1, ckpt_every=2,
                   fp16_export=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ToyTrainConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown toy training options {unknown}", where="train-toy config",
                              fix=f"use only {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def training_world(cfg: ToyTrainConfig) -> ToyShapes:
    """The training split the model learns from (the default biased world)."""
    return ToyShapes("train", cfg.n_train, WorldConfig(seed=cfg.seed, image_size=cfg.image_size))


def load_training_set(cfg: ToyTrainConfig, progress: bool = False, masks: bool = False) -> tuple:
    """All training images ``(N, H, W, 3)`` uint8 and their object records (and, with ``masks``,
    the ``(N, H, W)`` uint8 class masks as a third element)."""
    world = training_world(cfg)
    images = np.empty((len(world), cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    mask_arr = np.empty((len(world), cfg.image_size, cfg.image_size), dtype=np.uint8) if masks else None
    objects = []
    for i in _progress(range(len(world)), progress, "render scenes"):
        sample = world[i]
        images[i] = sample.image
        if mask_arr is not None:
            mask_arr[i] = sample.mask
        objects.append(sample.meta["objects"])
    return (images, objects) if mask_arr is None else (images, objects, mask_arr)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in ``[-1, 1]`` (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def augment_caption(objects: list[dict[str, Any]], rng: np.random.Generator, empty_prob: float = 0.1) -> str:
    """A random caption form for one scene.

    Mixes the full attribute caption, shuffled object order, randomly dropped attributes, the
    method's class-list prompt ``"a photo of circle, star"`` (segmentation) and single-class prompts
    ``"a photo of circle"`` / ``"a photo of a circle"`` (per-class ELBO), and empty captions
    (classifier-free guidance). Without the class-list and single-class forms the method's prompts
    would be out of distribution for a model trained only on full captions.
    """
    if rng.random() < empty_prob or not objects:
        return ""
    order = list(objects)
    mode = rng.random()
    if mode < 0.30:
        return "a photo of " + join_phrases([object_phrase(o) for o in order])
    if mode < 0.45:
        rng.shuffle(order)
        return "a photo of " + join_phrases([object_phrase(o) for o in order])
    if mode < 0.60:
        rng.shuffle(order)
        return "a photo of " + join_phrases(
            [object_phrase(o, colour=bool(rng.random() < 0.5), size=bool(rng.random() < 0.5)) for o in order])
    names = sorted({o["shape"] for o in objects}, key=CLASS_NAMES.index)
    if mode < 0.85:
        if rng.random() < 0.5:
            rng.shuffle(names)
        return "a photo of " + ", ".join(names)
    name = names[int(rng.integers(len(names)))]
    return f"a photo of {name}" if rng.random() < 0.5 else f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def build_vae(cfg: ToyTrainConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=cfg.vae_groups,
        sample_size=cfg.image_size,
    )


def build_text_encoder(cfg: ToyTrainConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=cfg.text_max_length, hidden_size=cfg.text_hidden,
        intermediate_size=4 * cfg.text_hidden, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, projection_dim=cfg.text_hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_unet(cfg: ToyTrainConfig):
    """Cross-attention at every resolution; the 16x16 up block gets ``layers_per_block + 1`` of them.

    The latent grid is ``image_size / 4``; with two levels the attention grids are 16x16 and 8x8.
    ``attention_head_dim`` is passed as the number of heads (diffusers' legacy naming for
    UNet2DConditionModel), giving 16-dim heads at both levels by default.
    """
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=cfg.image_size // 4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers_per_block,
        norm_num_groups=cfg.unet_groups, cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,
    )


def build_scheduler():
    """SD's noise schedule: 1000 steps, scaled-linear betas 0.00085 -> 0.012, epsilon prediction."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def build_tokenizer(cfg: ToyTrainConfig | None = None):
    """SD's CLIP BPE tokenizer with the run's context length (saved with the pipeline, so
    ``StableDiffusionPipeline`` and the toolkit's backbone pad to the same length)."""
    from t2ialign.core.clip_tokenizer import clip_tokenizer

    return clip_tokenizer(model_max_length=cfg.text_max_length if cfg is not None else 77)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------
# checkpoints and logs
# ------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` into memory, then an atomic rename: a kill never leaves a torn checkpoint."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
        raise InputError(f"checkpoint {path} cannot be read: {exc}", where=str(path),
                         fix="delete it to restart this stage from scratch") from exc


def _trim_log(path: Path, step: int) -> None:
    """Drop log records past the checkpoint we resume from (they will be recomputed)."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10%: a pure function of the step, so resuming is exact."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def _progress(iterable, enabled: bool, desc: str, initial: int = 0, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, initial=initial, total=total, mininterval=20, dynamic_ncols=False)


def _step_rng(cfg: ToyTrainConfig, stage: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """Per-step random streams: batches and noise depend only on (seed, stage, step)."""
    seq = np.random.SeedSequence([cfg.seed, 1000 + stage, step])
    gen = torch.Generator().manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] % (2**63)))
    return np.random.default_rng(seq), gen


def _train_loop(
    *,
    stage: str,
    out: Path,
    total_steps: int,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    base_lrs: list[float],
    step_fn: Callable[[int], dict[str, float]],
    cfg: ToyTrainConfig,
    progress: bool,
    extras: dict[str, Callable[[dict[str, Any] | None], Any]] | None = None,
) -> dict[str, Any]:
    """Shared resumable loop: restore, step, log, checkpoint. Returns the final checkpoint state.

    The stage folder is locked while training, so a second copy of the same stage fails fast
    with :class:`~t2ialign.core.errors.RunLockedError` instead of corrupting the checkpoint.
    """
    folder = out / stage
    folder.mkdir(parents=True, exist_ok=True)
    with OutputLock(folder):
        return _locked_loop(stage=stage, folder=folder, total_steps=total_steps, modules=modules,
                            optimizer=optimizer, base_lrs=base_lrs, step_fn=step_fn, cfg=cfg, progress=progress,
                            extras=extras or {})


def _locked_loop(*, stage: str, folder: Path, total_steps: int, modules: dict[str, torch.nn.Module],
                 optimizer: torch.optim.Optimizer, base_lrs: list[float],
                 step_fn: Callable[[int], dict[str, float]], cfg: ToyTrainConfig, progress: bool,
                 extras: dict[str, Callable[[dict[str, Any] | None], Any]]) -> dict[str, Any]:
    """The loop itself. ``extras`` maps a name to a factory called *after* the models are restored
    with the saved state of that name (or None: a checkpoint from before the extra existed); the
    object it returns must have ``state_dict()`` and is saved with every checkpoint."""
    ckpt_path, log_path = folder / "ckpt.pt", folder / "loss.jsonl"
    start, elapsed = 0, 0.0
    state = load_checkpoint(ckpt_path)
    if state is not None:
        for name, module in modules.items():
            module.load_state_dict(state["models"][name])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed = int(state["step"]), float(state["elapsed"])
        _trim_log(log_path, start)
    saved_extras = (state or {}).get("extras", {})
    live_extras = {name: make(saved_extras.get(name)) for name, make in extras.items()}

    def snapshot(step: int) -> dict[str, Any]:
        return {"step": step, "elapsed": elapsed, "config": cfg.to_dict(),
                "models": {k: m.state_dict() for k, m in modules.items()}, "optimizer": optimizer.state_dict(),
                "extras": {k: e.state_dict() for k, e in live_extras.items()}}

    for m in modules.values():
        m.train()
    t0 = time.time()
    for step in _progress(range(start, total_steps), progress, stage, initial=start, total=total_steps):
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * _lr_factor(step, total_steps, cfg.warmup)
        record = step_fn(step)
        if not all(math.isfinite(v) for v in record.values()):
            raise NumericalError(f"{stage} loss is not finite at step {step}: {record}", where=str(folder),
                                 fix="lower the learning rate, or resume from the last checkpoint")
        done = step + 1
        if done % cfg.log_every == 0 or done == total_steps:
            append_jsonl(log_path, {"stage": stage, "step": done, "lr": optimizer.param_groups[0]["lr"],
                                    "wall_s": round(elapsed + time.time() - t0, 2), **record})
        if done % cfg.ckpt_every == 0 or done == total_steps:
            elapsed += time.time() - t0
            t0 = time.time()
            save_checkpoint(ckpt_path, snapshot(done))
    if state is not None and start >= total_steps:
        return state
    return {"step": total_steps, "elapsed": elapsed, "live_extras": live_extras}


# ------------------------------------------------------------------------------------------------
# stage 1: VAE
# ------------------------------------------------------------------------------------------------
def train_vae(cfg: ToyTrainConfig, out: Path, progress: bool = False,
              data: tuple[np.ndarray, list] | None = None) -> Path:
    """Train (or resume) the autoencoder; writes ``out/vae/final`` with the measured scaling factor."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    target = out / "vae" / "final"
    stats_path = target / "t2ialign_vae_stats.json"
    ckpt = load_checkpoint(out / "vae" / "ckpt.pt") if stats_path.exists() else None
    if ckpt is not None and ckpt["step"] == cfg.vae_steps == json.loads(stats_path.read_text())["steps"]:
        # finished earlier: keep the exported VAE (and its scaling factor) the UNet was trained with
        return target
    images = data[0] if data is not None else load_training_set(cfg, progress)[0]
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)

    def step_fn(step: int) -> dict[str, float]:
        rng, gen = _step_rng(cfg, 1, step)
        x = to_tensor(images[rng.integers(len(images), size=cfg.vae_batch)])
        if rng.random() < 0.5:  # flips are free data for an autoencoder
            x = x.flip(-1)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean()  # summed over latent elements, averaged over the batch
        loss = rec + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return {"loss": loss.item(), "rec": rec.item(), "kl": kl.item()}

    final = _train_loop(stage="vae", out=out, total_steps=cfg.vae_steps, modules={"vae": vae}, optimizer=opt,
                        base_lrs=[cfg.vae_lr], step_fn=step_fn, cfg=cfg, progress=progress)
    if "models" in final:
        vae.load_state_dict(final["models"]["vae"])
    vae.eval()
    # SD scales latents to unit variance for the diffusion model; measure ours the same way
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        x = to_tensor(images[: min(len(images), 512)])
        z = torch.cat([vae.encode(x[i:i + 64]).latent_dist.sample(generator=gen) for i in range(0, len(x), 64)])
        scaling = float(1.0 / z.flatten().std())
        recon_mse = float(F.mse_loss(vae.decode(vae.encode(x[:64]).latent_dist.mean).sample, x[:64]))
    vae.register_to_config(scaling_factor=scaling)
    tmp = out / "vae" / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    atomic_write_json(tmp / "t2ialign_vae_stats.json", {"scaling_factor": scaling, "recon_mse_pm1": recon_mse,
                                                      "steps": cfg.vae_steps, "wall_s": final.get("elapsed")})
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def cache_latents(cfg: ToyTrainConfig, out: Path, vae, images: np.ndarray, progress: bool = False) -> torch.Tensor:
    """VAE posterior ``(mean, logvar)`` of every training image, cached in ``out/latents.pt``."""
    path = out / "latents.pt"
    key = {"n_train": cfg.n_train, "seed": cfg.seed, "image_size": cfg.image_size,
           "vae_mtime": (out / "vae" / "final" / "config.json").stat().st_mtime}
    if path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=False)
        if cached.get("key") == key:
            return cached["moments"].float()
    vae.eval()
    moments = []
    with torch.no_grad():
        for i in _progress(range(0, len(images), 128), progress, "encode latents"):
            enc = vae.encode(to_tensor(images[i:i + 128])).latent_dist
            moments.append(torch.cat([enc.mean, enc.logvar], 1).half())
    moments_t = torch.cat(moments)
    save_checkpoint(path, {"key": key, "moments": moments_t})
    return moments_t.float()


# ------------------------------------------------------------------------------------------------
# stage 2: text encoder + UNet
# ------------------------------------------------------------------------------------------------
def train_unet(cfg: ToyTrainConfig, out: Path, export: Path | None = None, progress: bool = False,
               data: tuple[np.ndarray, list] | None = None) -> Path:
    """Train (or resume) text encoder + UNet jointly; export the pipeline to ``out/pipeline`` (and ``export``)."""
    from diffusers import AutoencoderKL

    if not 8 <= cfg.text_max_length <= 77:
        raise ConfigError(f"text_max_length={cfg.text_max_length} is outside 8..77", where="train-toy config",
                          fix="toy captions need about 26 tokens; use e.g. --set text_max_length=32")
    if not cfg.cross_qk_lr_mult > 0:
        raise ConfigError(f"cross_qk_lr_mult={cfg.cross_qk_lr_mult} must be > 0", where="train-toy config",
                          fix="use 1.0 for the base learning rate, e.g. 3.0 to train query/key faster")
    if not 0 <= cfg.grounding_pixel_mass <= 1:
        raise ConfigError(f"grounding_pixel_mass={cfg.grounding_pixel_mass} must lie in [0, 1]", where="train-toy config",
                          fix="0 = off; e.g. 0.5 = half of an object pixel's attention on the object's words")
    if cfg.grounding_weight < 0 or not 0 < cfg.grounding_max_t <= 1000:
        raise ConfigError(f"grounding_weight={cfg.grounding_weight} / grounding_max_t={cfg.grounding_max_t} out of range",
                          where="train-toy config", fix="use grounding_weight >= 0 and 0 < grounding_max_t <= 1000")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + 1)
    vae_dir = out / "vae" / "final"
    if not vae_dir.exists():
        raise InputError(f"no trained VAE in {vae_dir}", where=str(out),
                         fix="run 't2ialign train-toy --stage vae' with the same --output first")
    vae = AutoencoderKL.from_pretrained(vae_dir)
    grounded = cfg.grounding_weight > 0
    if data is None or (grounded and len(data) < 3):
        data = load_training_set(cfg, progress, masks=grounded)
    images, objects = data[0], data[1]
    moments = cache_latents(cfg, out, vae, images, progress)
    del images
    if grounded:
        # per-class area fractions at the latent grid, fp16: 10000 x 11 x 16 x 16 is 56 MB
        side = moments.shape[-1]
        class_area = torch.cat([grounding.pooled_masks(data[2][i:i + 500], len(CLASS_NAMES), side).half()
                                for i in range(0, len(data[2]), 500)])
    scaling = float(vae.config.scaling_factor)
    tokenizer = build_tokenizer(cfg)
    text_encoder, unet, scheduler = build_text_encoder(cfg), build_unet(cfg), build_scheduler()
    alphas = scheduler.alphas_cumprod.float()
    token_class = grounding.class_token_table(tokenizer, CLASS_NAMES) if grounded else None
    colour_ids = grounding.word_token_ids(tokenizer, list(COLOURS)) if grounded and cfg.ground_colours else None
    cross_qk = [p for n, p in unet.named_parameters() if ".attn2.to_q." in n or ".attn2.to_k." in n]
    if not cross_qk:
        raise ConfigError("the toy UNet has no cross-attention query/key projections (attn2.to_q/to_k)",
                          where="train-toy", fix="check the UNet block types: they must be CrossAttn blocks")
    # (params, base lr) per optimizer group; at the base rate the shipped run's two groups are kept,
    # so its checkpoints still resume
    qk_ids = {id(p) for p in cross_qk} if cfg.cross_qk_lr_mult != 1.0 else set()
    plan = [([p for p in unet.parameters() if id(p) not in qk_ids], cfg.unet_lr),
            (list(text_encoder.parameters()), cfg.text_lr)]
    if qk_ids:
        plan.append((cross_qk, cfg.unet_lr * cfg.cross_qk_lr_mult))
    opt = torch.optim.AdamW([{"params": ps, "lr": lr} for ps, lr in plan], weight_decay=1e-2)
    base_lrs = [lr for _, lr in plan]

    def step_fn(step: int) -> dict[str, float]:
        rng, gen = _step_rng(cfg, 2, step)
        idx = rng.integers(len(moments), size=cfg.unet_batch)
        mean, logvar = moments[idx].chunk(2, dim=1)
        z0 = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)) * scaling
        prompts = [augment_caption(objects[i], rng, cfg.empty_caption_prob) for i in idx]
        ids = tokenizer(prompts, padding="max_length", max_length=cfg.text_max_length, truncation=True,
                        return_tensors="pt").input_ids
        cond = text_encoder(ids)[0]
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with grounding.probe_cross_attention(unet) if grounded else nullcontext() as maps:
            pred = unet(z_t, t, encoder_hidden_states=cond).sample
        loss = denoise = F.mse_loss(pred, noise)
        record: dict[str, float] = {}
        if grounded:
            supervised = token_class[ids]
            if colour_ids is not None:
                supervised = grounding.attribute_token_classes(ids, supervised, colour_ids)
            area, when = class_area[idx].float(), t < cfg.grounding_max_t
            ground = grounding.grounding_loss(maps, supervised, area, when)
            if cfg.grounding_pixel_mass > 0:
                ground = ground + grounding.pixel_mass_loss(maps, supervised, area, when, cfg.grounding_pixel_mass)
            loss = denoise + cfg.grounding_weight * ground
            record = {"denoise": denoise.item(), "grounding": ground.item()}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        if "ema" in ema:
            ema["ema"].step(trained)
        return {"loss": loss.item(), **record}

    trained = [*unet.parameters(), *text_encoder.parameters()]
    ema: dict[str, Any] = {}

    def make_ema(saved: dict[str, Any] | None):
        # Built after the checkpoint is restored, so an EMA added to an older run starts from its
        # current weights; diffusers' EMAModel ramps the decay up as (1 + n) / (10 + n).
        from diffusers.training_utils import EMAModel

        ema["ema"] = EMAModel(trained, decay=cfg.ema_decay)
        if saved is not None:
            ema["ema"].load_state_dict(saved)
        return ema["ema"]

    final = _train_loop(stage="unet", out=out, total_steps=cfg.unet_steps,
                        modules={"unet": unet, "text_encoder": text_encoder}, optimizer=opt,
                        base_lrs=base_lrs, step_fn=step_fn, cfg=cfg, progress=progress,
                        extras={"ema": make_ema} if cfg.ema_decay > 0 else None)
    if "models" in final:
        unet.load_state_dict(final["models"]["unet"])
        text_encoder.load_state_dict(final["models"]["text_encoder"])
    if "ema" in ema:
        ema["ema"].copy_to(trained)  # export the averaged weights
    folder = export_pipeline(cfg, out / "pipeline", vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             unet=unet, scheduler=scheduler, stats=_run_stats(out))
    if export is not None:
        dest = Path(export)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(folder, dest)
        folder = dest
    return folder


def _run_stats(out: Path) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for stage in ("vae", "unet"):
        records = list(read_jsonl(out / stage / "loss.jsonl"))
        if records:
            losses = [r["loss"] for r in records]
            k = max(1, len(losses) // 10)
            stats[stage] = {"steps": records[-1]["step"], "wall_s": records[-1]["wall_s"],
                            "loss_first10pct": float(np.mean(losses[:k])), "loss_last10pct": float(np.mean(losses[-k:]))}
    return stats


def export_pipeline(cfg: ToyTrainConfig, folder: Path, *, vae, text_encoder, tokenizer, unet, scheduler,
                    stats: dict[str, Any] | None = None) -> Path:
    """Save a ``StableDiffusionPipeline`` folder (fp16 weights if ``cfg.fp16_export``), atomically."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if cfg.fp16_export:
        pipe = pipe.to(torch.float16)
    pipe.save_pretrained(tmp)
    if cfg.fp16_export:
        pipe.to(torch.float32)  # callers keep using the float32 modules
    atomic_write_json(tmp / "t2ialign_toy.json", {
        "description": "t2ialign toy text-to-image model trained on the toy_shapes world",
        "class_names": ["background", *CLASS_NAMES], "config": cfg.to_dict(),
        "params": {"vae": count_params(vae), "text_encoder": count_params(text_encoder), "unet": count_params(unet)},
        "training": stats or {},
    })
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def train_all(cfg: ToyTrainConfig, out: Path, export: Path | None = None, progress: bool = False) -> Path:
    """Stages 1 and 2 in order, sharing the rendered training set."""
    data = load_training_set(cfg, progress, masks=cfg.grounding_weight > 0)
    train_vae(cfg, out, progress, data=data)
    return train_unet(cfg, out, export, progress, data=data)


#: one prompt per shape class (and one two-object prompt) for eyeballing a trained model
SAMPLE_PROMPTS = [
    "a photo of a red circle", "a photo of a blue square", "a photo of a yellow triangle", "a photo of a green star",
    "a photo of a purple heart", "a photo of an orange cross", "a photo of a red hexagon", "a photo of a blue diamond",
    "a photo of a yellow ring", "a photo of a green crescent", "a photo of a red star and a blue circle",
]


def sample_grid(folder: str | Path, path: str | Path, prompts: list[str] | None = None, steps: int = 25,
                guidance: float = 4.0, seed: int = 0) -> Path:
    """Generate one image per prompt with DDIM from a pipeline folder and save them side by side as a PNG."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompts or SAMPLE_PROMPTS, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed), output_type="np").images
    strip = (np.concatenate(list(images), axis=1) * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip).save(path)
    return path


def default_export_dir() -> Path:
    return ASSETS / "toy"


__all__ = [
    "ToyTrainConfig", "augment_caption", "build_scheduler", "build_text_encoder", "build_unet", "build_vae",
    "cache_latents", "export_pipeline", "load_training_set", "sample_grid", "train_all", "train_unet", "train_vae",
]
