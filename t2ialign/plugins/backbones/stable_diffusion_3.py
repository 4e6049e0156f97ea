"""Stable Diffusion 3 / 3.5 backbone: a rectified-flow MM-DiT with CLIP-L + CLIP-G (+ T5) text.

Everything SD3-specific lives here: the flow-matching noise table, how the three text encoders
are stitched into one joint text sequence, where CLIP tokens sit on that sequence, and which
``Attention`` modules of the transformer are joint (image+text) or image-only (SD3.5's ``attn2``).

Timestep convention (see :mod:`t2ialign.core.protocols`): ``t`` is a float index into diffusers'
``FlowMatchEulerDiscreteScheduler`` table flipped to increasing noise, so with ``N`` training
timesteps and the scheduler's static ``shift``::

    s = (t + 1) / N,   sigma = shift * s / (1 + (shift - 1) * s),   alpha = 1 - sigma
    model timestep input = N * sigma,   z_t = alpha * z0 + sigma * eps,   target v = eps - z0

For integer ``t`` this is exactly ``scheduler.sigmas.flip(0)[t]`` (checked by the tests).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from t2ialign.core.errors import ConfigError, InputError, ModelLoadError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.protocols import LayerInfo, TextCond
from t2ialign.core.specs import EntrySpec
from t2ialign.core.tokens import find_token_span
from t2ialign.plugins.backbones.common import (
    backbone_info_hook,
    component_loader,
    images_to_tensor,
    offline_mode,
    read_json_config,
    resolve_model_path,
    torch_dtype,
)

PLUGIN_NAME = "stable_diffusion_3"

#: registry options of this plugin -> defaults (the default's type is the accepted type)
OPTIONS: dict[str, Any] = {
    "model": "",
    "revision": None,
    "image_size": None,  # None: the VAE's sample_size (1024 for SD3/3.5)
    "offline": None,  # None: follow HF_HUB_OFFLINE
    "use_t5": True,  # False: zeros instead of T5 tokens, as diffusers does without text_encoder_3
    "t5_max_length": 256,
    "cross_gaussian_sigma": 3.0,
    "cross_weight": None,  # one weight per resolution group; SD3 has a single group
    "self_weight": [[1], [1]],  # the reference notebook's SD3 setting: K = mean(self) @ mean(self)
    "vae_dtype": "float32",  # fp16 VAEs can overflow; the reference runs the VAE in fp32
}


class StableDiffusion3Backbone:
    """Adapter of a diffusers SD3/SD3.5 checkpoint to the :class:`~t2ialign.core.protocols.Backbone` protocol.

    Built by :meth:`from_spec`; the constructor takes already-loaded components so tests
    and notebooks can also wrap an existing ``StableDiffusion3Pipeline``'s parts.
    """

    prediction_type = "flow"
    attention_kind = "mmdit"

    def __init__(
        self,
        *,
        name: str,
        transformer: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        text_encoder_2: torch.nn.Module,
        tokenizer: Any,
        tokenizer_2: Any,
        text_encoder_3: torch.nn.Module | None,
        tokenizer_3: Any | None,
        shift: float,
        num_train_timesteps: int,
        device: torch.device,
        dtype: torch.dtype,
        vae_dtype: torch.dtype,
        image_size: int,
        t5_max_length: int,
        layer_defaults: dict[str, Any],
    ):
        self.name = name
        self.denoiser = transformer
        self.vae = vae
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.device = device
        self.dtype = dtype
        self.vae_dtype = vae_dtype
        self.image_size = int(image_size)
        self.t5_max_length = int(t5_max_length)
        #: CLIP sequence length; both CLIP encoders are padded to the first tokenizer's length, as in diffusers
        self.clip_length = int(getattr(tokenizer, "model_max_length", 77) or 77)
        self.max_tokens = self.clip_length + self.t5_max_length
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.patch_size = int(transformer.config.patch_size)
        self.latent_size = self.image_size // self.vae_scale_factor
        side = self.latent_size // self.patch_size
        self.grid: tuple[int, int] = (side, side)
        self.layer_defaults = layer_defaults

    # ------------------------------------------------------------------ noise schedule
    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level of float timestep indices (float64 so the table matches diffusers to the last bit)."""
        t = torch.as_tensor(t)
        if t.dtype.is_complex or t.dtype == torch.bool:
            raise InputError(f"timesteps must be real numbers, got dtype {t.dtype}", where=self.name)
        t64 = t.to(torch.float64)
        lo, hi = 0.0, float(self.num_train_timesteps - 1)
        if t64.numel() and (not torch.isfinite(t64).all() or t64.min() < lo or t64.max() > hi):
            raise InputError(
                f"timestep index out of range: got values in [{t64.min().item():g}, {t64.max().item():g}]",
                where=f"backbone {self.name}",
                fix=f"timestep indices run from 0 to {self.num_train_timesteps - 1} (index into the flipped "
                "flow-matching sigma table)",
            )
        s = (t64 + 1.0) / self.num_train_timesteps
        return self.shift * s / (1.0 + (self.shift - 1.0) * s)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 - sigma, sigma)`` as float32 on ``t``'s device."""
        sigma = self._sigma(t)
        device = torch.as_tensor(t).device
        return (1.0 - sigma).to(device, torch.float32), sigma.to(device, torch.float32)

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """``2 log((1 - sigma) / sigma)``; ``-inf`` at the last index, where sigma is exactly 1."""
        sigma = self._sigma(t)
        return (2.0 * torch.log((1.0 - sigma) / sigma)).to(torch.as_tensor(t).device, torch.float32)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """What the transformer's ``timestep`` argument gets: ``N * sigma`` (diffusers' ``scheduler.timesteps``)."""
        return (self._sigma(t) * self.num_train_timesteps).to(torch.float32)

    def add_noise(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``(1 - sigma) z0 + sigma eps`` with one ``t`` per batch row (or one ``t`` for all)."""
        if noise.shape != z0.shape:
            raise InputError(
                f"noise shape {tuple(noise.shape)} differs from latent shape {tuple(z0.shape)}",
                where=f"backbone {self.name}.add_noise",
                fix="draw the noise with torch.randn_like(z0)",
            )
        alpha, sigma = self.alpha_sigma(self._per_row(t, z0.shape[0]))
        shape = (-1,) + (1,) * (z0.ndim - 1)
        alpha = alpha.to(z0.device).view(shape)
        sigma = sigma.to(z0.device).view(shape)
        return (alpha * z0.float() + sigma * noise.float()).to(z0.dtype)

    def _per_row(self, t: torch.Tensor | float, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        if t.numel() == 1:
            return t.expand(batch)
        if t.numel() != batch:
            raise InputError(
                f"got {t.numel()} timesteps for a batch of {batch}",
                where=f"backbone {self.name}",
                fix="pass one timestep per batch row, or a single timestep for all rows",
            )
        return t

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` -> ``(posterior mean - shift_factor) * scaling_factor`` (float32)."""
        x = images_to_tensor(images, self.image_size, device=self.device, dtype=self.vae_dtype)
        mean = self.vae.encode(x).latent_dist.mean
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return ((mean.float() - shift) * cfg.scaling_factor).contiguous()

    def _clip_states(self, tokenizer: Any, encoder: torch.nn.Module, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate hidden states and projected pooled output of one CLIP encoder."""
        ids = tokenizer(
            prompts, padding="max_length", max_length=self.clip_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        out = encoder(ids, output_hidden_states=True)
        # SD3 conditions on the penultimate layer (no final layer norm) and the projected pooled token
        return out.hidden_states[-2], out.text_embeds

    def _t5_states(self, prompts: list[str]) -> torch.Tensor:
        if self.text_encoder_3 is None:
            # diffusers' behaviour without T5: the T5 part of the sequence is all zeros
            width = int(self.denoiser.config.joint_attention_dim)
            return torch.zeros(len(prompts), self.t5_max_length, width, device=self.device, dtype=self.dtype)
        ids = self.tokenizer_3(
            prompts,
            padding="max_length",
            max_length=self.t5_max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder_3(ids)[0]

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> TextCond:
        """Conditional text only, as ``pipe.encode_prompt(p, p, p, do_classifier_free_guidance=False)``.

        ``embeds = [CLIP-L || CLIP-G (zero-padded to the T5 width) ; T5]`` along the sequence
        axis, ``(B, clip_length + t5_max_length, joint_attention_dim)``; ``pooled`` = both
        pooled outputs concatenated.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError(
                "encode_text needs a non-empty list of strings",
                where=f"backbone {self.name}",
                fix="pass prompts like ['a photo of cat, dog']",
            )
        l_states, l_pooled = self._clip_states(self.tokenizer, self.text_encoder, prompts)
        g_states, g_pooled = self._clip_states(self.tokenizer_2, self.text_encoder_2, prompts)
        t5 = self._t5_states(prompts).to(self.dtype)
        clip = torch.cat([l_states, g_states], dim=-1).to(self.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return TextCond(
            embeds=torch.cat([clip, t5], dim=-2),
            pooled=torch.cat([l_pooled, g_pooled], dim=-1).to(self.dtype),
        )

    # ------------------------------------------------------------------ denoiser
    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        """Velocity ``v = eps - z0`` predicted at ``(z_t, t)``, float32.

        ``cond`` must have one row per latent or a single row (then shared by all latents).
        Gradient mode is left to the caller (wrap in ``torch.no_grad()`` when not optimising).
        """
        batch = z_t.shape[0]
        if len(cond) == 1 and batch > 1:
            cond = cond.select([0] * batch)
        if len(cond) != batch:
            raise InputError(
                f"{len(cond)} text conditions for {batch} latents",
                where=f"backbone {self.name}.predict",
                fix="pass one condition per latent (TextCond.select can repeat rows) or a single one",
            )
        if cond.pooled is None:
            raise InputError("SD3 needs pooled text embeddings (TextCond.pooled is None)",
                             where=f"backbone {self.name}.predict", fix="build cond with encode_text")
        timestep = self.model_timestep(self._per_row(t, batch)).to(self.device)
        out = self.denoiser(
            hidden_states=z_t.to(self.device, self.dtype),
            encoder_hidden_states=cond.embeds.to(self.device, self.dtype),
            pooled_projections=cond.pooled.to(self.device, self.dtype),
            timestep=timestep.to(self.dtype),
            return_dict=False,
        )[0]
        return out.float()

    # ------------------------------------------------------------------ tokens and layers
    def token_spans(self, prompt: str, phrase: str) -> list[int]:
        """Positions of ``phrase`` on the joint text axis (the CLIP-token match ``find_token_span`` picks).

        The first ``clip_length`` positions of the joint axis are the CLIP tokens (BOS at 0),
        so a CLIP token position is also its joint-axis position; T5 positions are never used
        (as in the reference).
        """
        return find_token_span(self.tokenizer, prompt, phrase, max_tokens=self.clip_length)

    def attention_layers(self) -> list[LayerInfo]:
        """Joint ``transformer_blocks.i.attn`` layers and SD3.5's image-only ``attn2``, in forward order."""
        layers: list[LayerInfo] = []
        depth = {"joint": 0, "self": 0}
        for i, block in enumerate(self.denoiser.transformer_blocks):
            for attr, kind in (("attn", "joint"), ("attn2", "self")):
                if getattr(block, attr, None) is None:
                    continue
                # one token grid for all blocks, hence a single resolution group
                layers.append(LayerInfo(f"transformer_blocks.{i}.{attr}", kind, self.grid, 0, depth[kind], "block"))
                depth[kind] += 1
        return layers

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_spec(cls, spec: EntrySpec, device: str | torch.device = "cpu",
                  dtype: str = "float32") -> StableDiffusion3Backbone:
        """Load every part of an SD3/3.5 diffusers folder (or hub id) named by a registry entry."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        from t2ialign.core.clip_tokenizer import clip_tokenizer

        opts = _check_options(spec)
        offline = offline_mode(opts["offline"])
        revision = opts["revision"]
        try:
            path = resolve_model_path(opts["model"], offline=offline)
        except ModelLoadError as exc:
            raise ModelLoadError(exc.what, where=spec.where, fix=exc.fix) from exc
        model_dtype = torch_dtype(dtype)
        vae_dtype = torch_dtype(opts["vae_dtype"])
        dev = torch.device(device)
        common = dict(offline=offline, revision=revision)

        index = read_json_config(path, "", "model_index.json", what="model_index.json", **common)
        missing = [c for c in ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler") if not _present(index, c)]
        if missing:
            raise ModelLoadError(
                f"{path} is not a Stable Diffusion 3 folder: model_index.json ({index.get('_class_name')}) "
                f"lacks {missing}",
                where=spec.where,
                fix="point 'model:' at an SD3/SD3.5 diffusers folder, or use the backbone plugin of that "
                "model family (stable_diffusion, stable_diffusion_xl)",
            )

        load = component_loader(path, **common)

        transformer = load(SD3Transformer2DModel, "transformer", "SD3 transformer", model_dtype)
        vae = load(AutoencoderKL, "vae", "VAE", vae_dtype)
        text_encoder = load(CLIPTextModelWithProjection, "text_encoder", "CLIP-L text encoder", model_dtype)
        text_encoder_2 = load(CLIPTextModelWithProjection, "text_encoder_2", "CLIP-G text encoder", model_dtype)
        # the folder's tokenizers when it has them; SD's exact CLIP BPE built offline otherwise
        tokenizer = (load(CLIPTokenizer, "tokenizer", "CLIP tokenizer", None) if _present(index, "tokenizer")
                     else clip_tokenizer())
        tokenizer_2 = (load(CLIPTokenizer, "tokenizer_2", "CLIP tokenizer 2", None) if _present(index, "tokenizer_2")
                       else clip_tokenizer(pad_token="!"))
        text_encoder_3 = tokenizer_3 = None
        if opts["use_t5"] and _present(index, "text_encoder_3"):
            if not _present(index, "tokenizer_3"):
                raise ModelLoadError(
                    f"{path} has text_encoder_3 (T5) but no tokenizer_3",
                    where=spec.where,
                    fix="add the T5 tokenizer folder, or set use_t5: false to replace T5 tokens by zeros",
                )
            text_encoder_3 = load(T5EncoderModel, "text_encoder_3", "T5 text encoder", model_dtype)
            tokenizer_3 = load(AutoTokenizer, "tokenizer_3", "T5 tokenizer", None)
        sched = read_json_config(path, "scheduler", "scheduler_config.json", what="scheduler config", **common)
        sched = FlowMatchEulerDiscreteScheduler.from_config(sched).config
        if sched.get("use_dynamic_shifting"):
            raise ModelLoadError(
                "the scheduler uses resolution-dependent ('dynamic') shifting; this backbone needs a static shift",
                where=spec.where,
                fix="use an SD3/SD3.5 checkpoint (their schedulers have a static shift)",
            )

        image_size = opts["image_size"] or int(vae.config.sample_size)
        step = 2 ** (len(vae.config.block_out_channels) - 1) * int(transformer.config.patch_size)
        max_side = transformer.config.pos_embed_max_size
        if image_size % step or (max_side and image_size // step > max_side):
            raise ConfigError(
                f"image_size {image_size} does not fit this transformer (needs a multiple of {step}"
                + (f" of at most {max_side * step} px)" if max_side else ")"),
                where=spec.where,
                fix=f"set image_size to a multiple of {step}" + (f" up to {max_side * step}" if max_side else ""),
            )
        for module in (transformer, text_encoder, text_encoder_2, text_encoder_3, vae):
            if module is not None:  # dtypes were set by from_pretrained (which keeps fp32-only modules in fp32)
                module.to(dev).eval().requires_grad_(False)

        layer_defaults = {
            "cross_weight": [float(w) for w in opts["cross_weight"]] if opts["cross_weight"] is not None else [1.0],
            "cross_gaussian_sigma": float(opts["cross_gaussian_sigma"]),
            "self_weight": [[float(w) for w in row] for row in opts["self_weight"]],
        }
        return cls(
            name=spec.name, transformer=transformer, vae=vae,
            text_encoder=text_encoder, text_encoder_2=text_encoder_2, text_encoder_3=text_encoder_3,
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3,
            shift=float(sched["shift"]), num_train_timesteps=int(sched["num_train_timesteps"]),
            device=dev, dtype=model_dtype, vae_dtype=vae_dtype, image_size=image_size,
            t5_max_length=opts["t5_max_length"], layer_defaults=layer_defaults,
        )


# ----------------------------------------------------------------------------------- helpers
def _check_options(spec: EntrySpec) -> dict[str, Any]:
    """Validate the options whose registry type is 'any' (``None`` default) or needs a range."""
    opts = {**OPTIONS, **spec.options}
    where = spec.where

    def bad(key: str, msg: str, fix: str) -> ConfigError:
        return ConfigError(f"option '{key}' {msg}", where=where, fix=fix)

    size = opts["image_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise bad("image_size", f"must be a positive integer or null, got {size!r}",
                  "use e.g. image_size: 1024, or leave it out to use the VAE's sample_size")
    if opts["offline"] is not None and not isinstance(opts["offline"], bool):
        raise bad("offline", f"must be true, false or null, got {opts['offline']!r}", "use offline: true")
    if opts["t5_max_length"] <= 0:
        raise bad("t5_max_length", f"must be positive, got {opts['t5_max_length']}", "use t5_max_length: 256")
    if opts["cross_gaussian_sigma"] < 0:
        raise bad("cross_gaussian_sigma", f"must be >= 0, got {opts['cross_gaussian_sigma']}",
                  "use 0 for per-group weights or a positive std such as 3.0")
    cw = opts["cross_weight"]
    if cw is not None and (
        not isinstance(cw, (list, tuple)) or len(cw) != 1 or not all(_is_number(w) for w in cw)
    ):
        raise bad("cross_weight", f"must be a list of one number (SD3 has one resolution group), got {cw!r}",
                  "use cross_weight: [1] or leave it out")
    sw = opts["self_weight"]
    if not sw or not all(isinstance(row, (list, tuple)) and len(row) == 1 and _is_number(row[0]) and row[0] > 0
                         for row in sw):
        raise bad("self_weight", f"must be a list of rows with one positive number each (one resolution group), "
                  f"got {sw!r}", "use self_weight: [[1], [1]]")
    if opts["revision"] is not None and not isinstance(opts["revision"], str):
        raise bad("revision", f"must be a string or null, got {opts['revision']!r}", "use e.g. revision: main")
    return opts


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _present(model_index: dict[str, Any], component: str) -> bool:
    """Does ``model_index.json`` declare ``component`` (``[library, class]``, not ``[null, null]``)?"""
    entry = model_index.get(component)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


# ----------------------------------------------------------------------------------- hooks
t2ialign_plugin_info = backbone_info_hook(
    PLUGIN_NAME, OPTIONS, "Stable Diffusion 3 / 3.5 (rectified flow MM-DiT, CLIP-L + CLIP-G + optional T5)")


@hookimpl
def t2ialign_make_backbone(spec: EntrySpec, device: str, dtype: str) -> StableDiffusion3Backbone | None:
    return StableDiffusion3Backbone.from_spec(spec, device, dtype) if spec.plugin == PLUGIN_NAME else None


__all__ = ["OPTIONS", "PLUGIN_NAME", "StableDiffusion3Backbone"]
