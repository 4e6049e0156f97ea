"""Stable Diffusion 1.x / 2.x (and the project's toy model) as a t2ialign backbone.

Loads ``UNet2DConditionModel`` + ``CLIPTextModel`` + ``AutoencoderKL`` + CLIP tokenizer + the
scheduler config from a diffusers-layout folder or hub id, and exposes what the method needs:
VAE posterior-mean latents, conditional text embeddings, the DDPM noise schedule at (possibly
fractional) timestep indices, the denoiser's native prediction, token positions and the list of
attention layers in forward order with their grids and resolution groups.

The SDXL plugin (``stable_diffusion_xl.py``) subclasses :class:`StableDiffusionBackbone` and only
replaces the text side.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch

from t2ialign.core.errors import ConfigError, InputError, ModelLoadError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.protocols import LayerInfo, TextCond
from t2ialign.core.specs import EntrySpec
from t2ialign.core.tokens import find_token_span
from t2ialign.plugins.backbones.common import (
    backbone_info_hook,
    images_to_tensor,
    is_local,
    load_component,
    offline_mode,
    read_json_config,
    resolve_model_path,
    torch_dtype,
)

PLUGIN_NAME = "stable_diffusion"
PREDICTION_TYPES = ("epsilon", "v_prediction")

#: registry options of SD 1.x/2.x entries (name -> default; the default's type is the accepted type).
#: Layer weights follow the reference defaults for SD's 7 cross-attention resolution groups
#: (down64, down32, down16, mid8, up16, up32, up64); a model with another layout must set them.
OPTIONS: dict[str, Any] = {
    "model": "",
    "revision": None,
    "prediction": None,
    "image_size": None,
    "offline": None,
    "cross_weight": [1, 1, 10, 15, 10, 1, 1],
    "cross_gaussian_sigma": 0.0,
    "self_weight": [[1, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 1]],
    "vae_dtype": "float32",
}

_PLACE_RANK = {"down": 0, "mid": 1, "up": 2}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


# --------------------------------------------------------------------------------------------
# attention-layer layout of a UNet
# --------------------------------------------------------------------------------------------
def _halve(n: int) -> int:
    # a stride-2, kernel-3, padding-1 convolution maps n -> ceil(n / 2)
    return (n + 1) // 2


def unet_attention_layers(unet: torch.nn.Module, latent_hw: tuple[int, int]) -> list[LayerInfo]:
    """Every ``Attention`` module of a ``UNet2DConditionModel`` in forward order.

    Module registration order is *not* forward order (diffusers registers ``up_blocks`` before
    ``mid_block``), so layers are ordered down -> mid -> up, then block index, then registration
    order inside a block (which is forward order there: attentions[i] after attentions[i-1],
    ``attn1`` before ``attn2``). Grids follow the blocks' down/upsamplers; works on ``meta``
    modules too, so the layout of a full-size model can be listed without its weights.
    """
    from diffusers.models.attention_processor import Attention

    down_blocks = list(getattr(unet, "down_blocks", []))
    up_blocks = list(getattr(unet, "up_blocks", []))
    # grid after k downsamplers
    levels = [tuple(latent_hw)]
    for block in down_blocks:
        if getattr(block, "downsamplers", None) is not None:
            levels.append((_halve(levels[-1][0]), _halve(levels[-1][1])))
    n_down = len(levels) - 1

    def level_of(place: str, index: int) -> int:
        if place == "down":
            return sum(1 for b in down_blocks[:index] if getattr(b, "downsamplers", None) is not None)
        if place == "mid":
            return n_down
        ups = sum(1 for b in up_blocks[:index] if getattr(b, "upsamplers", None) is not None)
        return max(n_down - ups, 0)

    found: list[tuple[tuple[int, int, int], str, str, tuple[int, int]]] = []
    for order, (name, module) in enumerate(unet.named_modules()):
        if not isinstance(module, Attention):
            continue
        match = _BLOCK.match(name)
        if match is None:
            continue  # not in the down/mid/up path (no such layer in SD/SDXL UNets)
        place = "mid" if match.group(3) else match.group(1).split("_")[0]
        index = 0 if place == "mid" else int(match.group(2))
        kind = "cross" if module.is_cross_attention else "self"
        found.append(((_PLACE_RANK[place], index, order), name, kind, levels[level_of(place, index)]))
    found.sort(key=lambda item: item[0])

    layers: list[LayerInfo] = []
    state: dict[str, dict[str, Any]] = {}
    for (rank, _, _), name, kind, grid in found:
        st = state.setdefault(kind, {"depth": 0, "group": -1, "grid": None})
        if grid != st["grid"]:
            st["group"] += 1
            st["grid"] = grid
        place = next(p for p, r in _PLACE_RANK.items() if r == rank)
        layers.append(LayerInfo(name=name, kind=kind, grid=grid, group=st["group"], depth=st["depth"], place=place))
        st["depth"] += 1
    return layers


# --------------------------------------------------------------------------------------------
# the backbone
# --------------------------------------------------------------------------------------------
class StableDiffusionBackbone:
    """A DDPM-family latent diffusion model with a ``UNet2DConditionModel`` denoiser.

    Build it with :meth:`from_spec`. Public attributes: ``unet`` (= ``denoiser``), ``vae``,
    ``text_encoder``, ``tokenizer``, ``scheduler_config``, ``prediction_type``, ``image_size``,
    ``latent_size``, ``num_train_timesteps``, ``max_tokens``, ``layer_defaults``.
    """

    attention_kind = "unet"

    def __init__(
        self,
        *,
        name: str,
        unet: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        scheduler_config: dict[str, Any],
        prediction_type: str,
        image_size: int,
        device: torch.device,
        dtype: torch.dtype,
        layer_defaults: dict[str, Any],
    ) -> None:
        self.name = name
        self.unet = unet
        self.denoiser = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.prediction_type = prediction_type
        self.device = device
        self.dtype = dtype
        self.layer_defaults = layer_defaults
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if image_size % self.vae_scale_factor:
            raise ConfigError(
                f"image_size {image_size} is not a multiple of the VAE's downsampling factor {self.vae_scale_factor}",
                where=f"backbones.{name}.image_size",
                fix=f"use a multiple of {self.vae_scale_factor} (the model's native size is "
                f"{vae.config.sample_size})",
            )
        self.image_size = int(image_size)
        self.latent_size = self.image_size // self.vae_scale_factor
        self.max_tokens = int(min(getattr(tokenizer, "model_max_length", 77) or 77, 77))
        self._log_snr_table, self.num_train_timesteps = self._schedule(self.scheduler_config)
        self._layers: list[LayerInfo] | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return dict(OPTIONS)

    @classmethod
    def from_spec(cls, spec: EntrySpec, device: str | torch.device = "cpu",
                  dtype: str = "float32") -> StableDiffusionBackbone:
        """Load every component of the entry ``spec`` (a hub id, local folder or ``builtin:NAME``)."""
        opts = {**cls.default_options(), **spec.options}
        offline = offline_mode(opts.get("offline"))
        path = resolve_model_path(opts.get("model", ""), offline=offline)
        revision = opts.get("revision")
        dev = torch.device(device)
        model_dtype = torch_dtype(dtype)
        vae_dtype = torch_dtype(opts.get("vae_dtype") or "float32")
        from diffusers import AutoencoderKL, UNet2DConditionModel

        common = dict(offline=offline, revision=revision)
        # the scheduler config is read first: it is the smallest file, so a hub id without network
        # fails here fast with the one clear message
        scheduler_config = read_json_config(path, "scheduler", "scheduler_config.json",
                                            what="scheduler config", **common)
        unet = load_component(UNet2DConditionModel, path, "unet", dtype=model_dtype, what="UNet", **common)
        vae = load_component(AutoencoderKL, path, "vae", dtype=vae_dtype, what="VAE", **common)
        text_parts = cls._load_text_parts(path, model_dtype, **common)
        for module in (unet, vae, *[m for m in text_parts.values() if isinstance(m, torch.nn.Module)]):
            module.requires_grad_(False).eval()
        unet.to(dev)
        vae.to(dev)
        for key, value in text_parts.items():
            if isinstance(value, torch.nn.Module):
                value.to(dev)

        prediction = opts.get("prediction") or scheduler_config.get("prediction_type") or "epsilon"
        if prediction not in PREDICTION_TYPES:
            raise ConfigError(
                f"prediction type '{prediction}' is not supported by plugin '{spec.plugin}'",
                where=f"{spec.where}.prediction",
                fix=f"use one of {list(PREDICTION_TYPES)} (or leave it unset to read the scheduler config)",
            )
        image_size = opts.get("image_size") or vae.config.sample_size
        if isinstance(image_size, (list, tuple)):
            image_size = image_size[0]
        layer_defaults = {
            "cross_weight": opts.get("cross_weight"),
            "cross_gaussian_sigma": float(opts.get("cross_gaussian_sigma") or 0.0),
            "self_weight": opts.get("self_weight"),
        }
        return cls(
            name=spec.name,
            unet=unet,
            vae=vae,
            scheduler_config=scheduler_config,
            prediction_type=prediction,
            image_size=int(image_size),
            device=dev,
            dtype=model_dtype,
            layer_defaults=layer_defaults,
            **text_parts,
        )

    @classmethod
    def _load_text_parts(cls, path: str, dtype: torch.dtype, *, offline: bool,
                         revision: str | None) -> dict[str, Any]:
        """``text_encoder`` and ``tokenizer`` (subclasses add their own)."""
        from transformers import CLIPTextModel

        text_encoder = load_component(CLIPTextModel, path, "text_encoder", dtype=dtype, what="text encoder",
                                      offline=offline, revision=revision)
        tokenizer = load_tokenizer(path, "tokenizer", offline=offline, revision=revision)
        return {"text_encoder": text_encoder, "tokenizer": tokenizer}

    # ------------------------------------------------------------------ schedule
    @staticmethod
    def _schedule(config: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """log-SNR at every integer timestep, from the DDPM ``alphas_cumprod`` of the config."""
        from diffusers import DDIMScheduler

        # DDIM's constructor computes the same betas -> alphas_cumprod as every DDPM-family
        # scheduler (Euler, PNDM, DDPM) from the shared config keys
        scheduler = DDIMScheduler.from_config(config)
        acp = scheduler.alphas_cumprod.to(torch.float64)
        return torch.log(acp) - torch.log1p(-acp), int(acp.shape[0])

    def _check_t(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if not torch.isfinite(t).all() or (t < 0).any() or (t > self.num_train_timesteps - 1).any():
            raise InputError(
                f"timestep indices must lie in [0, {self.num_train_timesteps - 1}], got "
                f"min {float(t.min()):.3f} max {float(t.max()):.3f}",
                where=f"backbone {self.name}",
                fix="check the timestep grid of the configuration",
            )
        return t

    def _lambda64(self, t: torch.Tensor) -> torch.Tensor:
        """float64 log-SNR on the CPU, interpolated linearly between integer timesteps."""
        t = self._check_t(t).cpu()
        lo = t.floor().clamp(max=self.num_train_timesteps - 2).long()
        frac = t - lo
        return self._log_snr_table[lo] * (1 - frac) + self._log_snr_table[lo + 1] * frac

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """``log(alpha^2 / sigma^2)`` at timestep indices ``t`` (float32, on ``t``'s device)."""
        device = t.device if isinstance(t, torch.Tensor) else torch.device("cpu")
        return self._lambda64(t).to(device=device, dtype=torch.float32)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha = sqrt(sigmoid(lambda))``, ``sigma = sqrt(sigmoid(-lambda))`` (variance preserving);
        at integer ``t`` these are ``sqrt(alphas_cumprod[t])`` and ``sqrt(1 - alphas_cumprod[t])``."""
        device = t.device if isinstance(t, torch.Tensor) else torch.device("cpu")
        lam = self._lambda64(t)
        alpha = torch.sigmoid(lam).sqrt()
        sigma = torch.sigmoid(-lam).sqrt()
        return alpha.to(device=device, dtype=torch.float32), sigma.to(device=device, dtype=torch.float32)

    def add_noise(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``z_t = alpha_t z0 + sigma_t noise``; ``t`` is a scalar or one index per batch row."""
        alpha, sigma = self.alpha_sigma(torch.as_tensor(t, device=z0.device))
        shape = (-1,) + (1,) * (z0.ndim - 1)
        return alpha.reshape(shape).to(z0.dtype) * z0 + sigma.reshape(shape).to(z0.dtype) * noise

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in ``[0, 1]`` (any size) -> ``scaling_factor * (posterior mean - shift)``, float32."""
        vae_dtype = next(self.vae.parameters()).dtype
        x = images_to_tensor(images, self.image_size, device=self.device, dtype=vae_dtype)
        mean = self.vae.encode(x).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((mean.float() - shift) * float(self.vae.config.scaling_factor))

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images ``(B, 3, S, S)`` in ``[0, 1]`` (float32)."""
        vae_dtype = next(self.vae.parameters()).dtype
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = z.to(self.device, torch.float32) / float(self.vae.config.scaling_factor) + shift
        images = self.vae.decode(z.to(vae_dtype)).sample.float()
        return ((images + 1) / 2).clamp(0, 1)

    def _tokenize(self, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = tokenizer(list(prompts), padding="max_length", max_length=self.max_tokens, truncation=True,
                        return_tensors="pt").input_ids
        return ids.to(self.device)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> TextCond:
        """Last hidden state of the CLIP text encoder, padded to 77 tokens (what SD 1.x/2.x feed)."""
        ids = self._tokenize(self.tokenizer, prompts)
        hidden = self.text_encoder(ids)[0]
        return TextCond(embeds=hidden.to(self.dtype))

    # ------------------------------------------------------------------ denoiser
    def _added_cond(self, cond: TextCond) -> dict[str, Any]:
        """Extra UNet keyword arguments (none for SD 1.x/2.x; SDXL adds micro-conditioning)."""
        return {}

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        """Native UNet output (epsilon or v), float32. ``t``: scalar or ``(B,)`` timestep indices.

        Gradient mode is left to the caller: the weights are frozen, so no graph is built unless
        an input requires grad (null-text inversion optimises the unconditional embedding).
        """
        batch = z_t.shape[0]
        if len(cond) != batch:
            raise InputError(f"{batch} latents but {len(cond)} text conditions",
                             fix="select one condition per latent (TextCond.select)")
        t = torch.as_tensor(t, device=self.device, dtype=torch.float32).reshape(-1)
        self._check_t(t)
        if t.numel() == 1:
            t = t.expand(batch)
        out = self.unet(
            z_t.to(self.device, self.dtype),
            t,
            encoder_hidden_states=cond.embeds.to(self.device, self.dtype),
            added_cond_kwargs=self._added_cond(cond) or None,
        ).sample
        return out.float()

    # ------------------------------------------------------------------ attention
    def token_spans(self, prompt: str, phrase: str) -> list[int]:
        return find_token_span(self.tokenizer, prompt, phrase, max_tokens=self.max_tokens)

    def attention_layers(self) -> list[LayerInfo]:
        if self._layers is None:
            self._layers = unet_attention_layers(self.unet, (self.latent_size, self.latent_size))
        return list(self._layers)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, prediction={self.prediction_type}, "
                f"image_size={self.image_size}, device={self.device}, dtype={self.dtype})")


def load_tokenizer(path: str, subfolder: str, *, offline: bool, revision: str | None,
                   pad_token: str | None = None) -> Any:
    """The folder's CLIP tokenizer, or the offline-built SD one when the folder has none.

    ``pad_token``: what the fallback pads with (``"!"`` for SD 2.x / SDXL encoder 2).
    """
    from transformers import CLIPTokenizer

    from t2ialign.core.clip_tokenizer import EOS, clip_tokenizer

    if not is_local(path) or (Path(path) / subfolder).is_dir():
        try:
            return load_component(CLIPTokenizer, path, subfolder, dtype=None, offline=offline,
                                  what="tokenizer", revision=revision)
        except ModelLoadError:
            pass  # the BPE table is the same for every CLIP model: rebuild it offline
    return clip_tokenizer(pad_token=pad_token or EOS)


# --------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------
t2ialign_plugin_info = backbone_info_hook(
    PLUGIN_NAME, OPTIONS,
    "Stable Diffusion 1.x/2.x and SD-layout models (UNet + CLIP text + VAE) from a folder or hub id")


@hookimpl
def t2ialign_make_backbone(spec: EntrySpec, device: str, dtype: str) -> StableDiffusionBackbone | None:
    return StableDiffusionBackbone.from_spec(spec, device, dtype) if spec.plugin == PLUGIN_NAME else None


__all__ = [
    "OPTIONS",
    "PLUGIN_NAME",
    "StableDiffusionBackbone",
    "load_tokenizer",
    "unet_attention_layers",
]
