"""FLUX.1 backbone (``plugin: flux``): a rectified-flow MM-DiT with CLIP (pooled) + T5 (tokens) text.

What is FLUX-specific and lives here:

- the noise table: FLUX.1's scheduler shifts it by the image's token count (``use_dynamic_shifting``);
  at the backbone's fixed working size that is one effective shift, resolved once from ``mu`` exactly
  as ``FluxPipeline`` computes it (:mod:`t2ialign_flux.schedule`);
- the latent layout: VAE latents ``(B, C, h, w)`` are packed into ``(B, h/2 * w/2, 4C)`` tokens with
  ``(0, row, col)`` position ids for the transformer's rotary embedding, and the prediction is
  unpacked back, so the rest of t2ialign sees ordinary latents;
- the text axis: only the T5 tokens form the sequence the image attends to (CLIP gives the pooled
  vector only), so class-token positions are positions of the T5 tokenizer;
- guidance distillation: FLUX.1-dev's transformer takes a ``guidance`` scale input (option
  ``guidance``, default the pipeline's 3.5); FLUX.1-schnell's takes none.

Timestep convention (see :mod:`t2ialign.core.protocols`): ``t`` in ``[0, N - 1]``, ``s = (t + 1) / N``,
``sigma = shift * s / (1 + (shift - 1) * s)``, ``alpha = 1 - sigma``; the transformer's ``timestep``
input is ``sigma`` itself (the pipeline passes ``scheduler.timesteps / 1000``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from t2ialign.core.errors import ConfigError, InputError, ModelLoadError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.protocols import LayerInfo, TextCond
from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign.core.tokens import find_token_span
from t2ialign.plugins.backbones.common import (
    images_to_tensor,
    load_component,
    offline_mode,
    read_json_config,
    resolve_model_path,
    torch_dtype,
)
from t2ialign_flux.schedule import FlowShiftSchedule

PLUGIN_NAME = "flux"
#: the transformer's attention layers are ``FluxAttention`` modules, hooked by ``flux_attention``
ATTENTION_KIND = "flux"
#: FluxPipeline's default ``guidance_scale`` for guidance-distilled checkpoints
DEFAULT_GUIDANCE = 3.5

#: registry options of this plugin -> defaults (the default's type is the accepted type)
OPTIONS: dict[str, Any] = {
    "model": "",
    "revision": None,
    "image_size": None,  # None: the VAE's sample_size (1024 for FLUX.1)
    "offline": None,  # None: follow HF_HUB_OFFLINE
    "t5_max_length": 512,  # FluxPipeline's max_sequence_length (schnell was trained with 256)
    "guidance": None,  # None: 3.5 for guidance-distilled transformers, nothing otherwise
    # untuned defaults: every layer counts the same (no reference setting exists for FLUX)
    "cross_gaussian_sigma": 0.0,
    "cross_weight": None,  # one weight per resolution group; FLUX has a single group -> [1]
    "self_weight": [[1], [1]],  # K = mean(self) @ mean(self), as the SD3 reference setting
    "vae_dtype": "float32",
}


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h/2 * w/2, 4C)``: each 2x2 patch becomes one token, row-major,
    channels outermost inside the token (the layout FLUX.1 was trained on)."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``h x w``."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_position_ids(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(rows * cols, 3)`` ids ``(0, row, col)`` of the packed image tokens, row-major."""
    r = torch.arange(rows, device=device, dtype=dtype).repeat_interleave(cols)
    c = torch.arange(cols, device=device, dtype=dtype).repeat(rows)
    return torch.stack([torch.zeros_like(r), r, c], dim=1)


class FluxBackbone:
    """Adapter of a diffusers FLUX.1 checkpoint to the :class:`~t2ialign.core.protocols.Backbone` protocol.

    Built by :func:`load_flux_backbone`; the constructor takes loaded components so tests and
    notebooks can also wrap the parts of an existing ``FluxPipeline``.
    """

    prediction_type = "flow"
    attention_kind = ATTENTION_KIND

    def __init__(self, *, name: str, transformer: torch.nn.Module, vae: torch.nn.Module,
                 text_encoder: torch.nn.Module, tokenizer: Any, text_encoder_2: torch.nn.Module,
                 tokenizer_2: Any, scheduler_config: dict[str, Any], device: torch.device,
                 dtype: torch.dtype, vae_dtype: torch.dtype, image_size: int, t5_max_length: int,
                 guidance: float | None, layer_defaults: dict[str, Any]):
        self.name = name
        self.denoiser = transformer
        self.vae = vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.device, self.dtype, self.vae_dtype = device, dtype, vae_dtype
        self.image_size = int(image_size)
        self.t5_max_length = int(t5_max_length)
        self.max_tokens = self.t5_max_length  # the image attends to the T5 tokens only
        self.clip_length = int(getattr(tokenizer, "model_max_length", 77) or 77)
        self.guidance = guidance
        self.layer_defaults = layer_defaults
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_size = self.image_size // self.vae_scale_factor
        side = self.latent_size // 2
        self.grid: tuple[int, int] = (side, side)
        #: packed image tokens per image: what FluxPipeline feeds ``calculate_shift``
        self.image_seq_len = side * side
        self.schedule = FlowShiftSchedule.from_scheduler_config(
            scheduler_config, self.image_seq_len, where=f"backbone {name}: scheduler config")
        self.num_train_timesteps = self.schedule.num_train_timesteps
        self._img_ids = image_position_ids(side, side, device, dtype)

    # ------------------------------------------------------------------ noise schedule
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.schedule.alpha_sigma(t, where=f"backbone {self.name}")

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.log_snr(t, where=f"backbone {self.name}")

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The transformer's ``timestep`` input: ``sigma`` (it multiplies by 1000 itself)."""
        return self.schedule.sigma(t, where=f"backbone {self.name}").to(torch.float32)

    def _per_row(self, t: torch.Tensor | float, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        if t.numel() == 1:
            return t.expand(batch)
        if t.numel() != batch:
            raise InputError(f"got {t.numel()} timesteps for a batch of {batch}", where=f"backbone {self.name}",
                             fix="pass one timestep per batch row, or a single timestep for all rows")
        return t

    def add_noise(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``(1 - sigma) z0 + sigma eps`` with one ``t`` per batch row (or one ``t`` for all)."""
        if noise.shape != z0.shape:
            raise InputError(f"noise shape {tuple(noise.shape)} differs from latent shape {tuple(z0.shape)}",
                             where=f"backbone {self.name}.add_noise", fix="draw the noise with torch.randn_like(z0)")
        alpha, sigma = self.alpha_sigma(self._per_row(t, z0.shape[0]))
        shape = (-1,) + (1,) * (z0.ndim - 1)
        alpha, sigma = alpha.to(z0.device).view(shape), sigma.to(z0.device).view(shape)
        return (alpha * z0.float() + sigma * noise.float()).to(z0.dtype)

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` -> ``(posterior mean - shift_factor) * scaling_factor`` (float32)."""
        x = images_to_tensor(images, self.image_size, device=self.device, dtype=self.vae_dtype)
        mean = self.vae.encode(x).latent_dist.mean
        cfg = self.vae.config
        return ((mean.float() - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor).contiguous()

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> TextCond:
        """As ``FluxPipeline.encode_prompt(p, max_sequence_length=t5_max_length)``.

        ``embeds``: T5 last hidden states ``(B, t5_max_length, joint_attention_dim)``;
        ``pooled``: CLIP's pooled output ``(B, pooled_projection_dim)``.
        """
        prompts = prompt_list(prompts, self.name)
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=self.clip_length, truncation=True,
                                  return_tensors="pt").input_ids.to(self.device)
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.t5_max_length, truncation=True,
                                  return_tensors="pt").input_ids.to(self.device)
        embeds = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return TextCond(embeds=embeds.to(self.dtype), pooled=pooled.to(self.dtype))

    # ------------------------------------------------------------------ denoiser
    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        """Velocity ``v = eps - z0`` at ``(z_t, t)`` as a ``(B, C, h, w)`` float32 latent.

        ``cond`` must have one row per latent or a single row (then shared by all latents).
        """
        batch, _, h, w = z_t.shape
        if len(cond) == 1 and batch > 1:
            cond = cond.select([0] * batch)
        if len(cond) != batch:
            raise InputError(f"{len(cond)} text conditions for {batch} latents", where=f"backbone {self.name}.predict",
                             fix="pass one condition per latent (TextCond.select can repeat rows) or a single one")
        if cond.pooled is None:
            raise InputError("FLUX needs the pooled CLIP embedding (TextCond.pooled is None)",
                             where=f"backbone {self.name}.predict", fix="build cond with encode_text")
        if (h, w) != (self.latent_size, self.latent_size):
            # the shift (and so the noise table) was fixed for this token count
            raise InputError(f"latent of {h}x{w} given, this backbone works at {self.latent_size}x{self.latent_size}",
                             where=f"backbone {self.name}.predict",
                             fix="encode images with backbone.encode_image, or set the entry's image_size")
        timestep = self.model_timestep(self._per_row(t, batch)).to(self.device, self.dtype)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((batch,), float(self.guidance), device=self.device, dtype=torch.float32)
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        out = self.denoiser(
            hidden_states=pack_latents(z_t.to(self.device, self.dtype)),
            encoder_hidden_states=cond.embeds.to(self.device, self.dtype),
            pooled_projections=cond.pooled.to(self.device, self.dtype),
            timestep=timestep,
            img_ids=self._img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack_latents(out.float(), h, w)

    # ------------------------------------------------------------------ tokens and layers
    def token_spans(self, prompt: str, phrase: str) -> list[int]:
        """Positions of ``phrase``'s T5 tokens: the text part of every joint attention map is the T5
        sequence (there is no BOS, so position 0 is the prompt's first token)."""
        return find_token_span(self.tokenizer_2, prompt, phrase, max_tokens=self.t5_max_length)

    def attention_layers(self) -> list[LayerInfo]:
        """The joint attention of every double-stream block, then of every single-stream block (forward order).

        All are kind ``"joint"`` (image and text tokens in one softmax) on one token grid, hence
        one resolution group; ``place`` tells the two block types apart.
        """
        layers: list[LayerInfo] = []
        names = [f"transformer_blocks.{i}.attn" for i in range(len(self.denoiser.transformer_blocks))]
        names += [f"single_transformer_blocks.{i}.attn" for i in range(len(self.denoiser.single_transformer_blocks))]
        for depth, name in enumerate(names):
            place = "double" if name.startswith("transformer_blocks") else "single"
            layers.append(LayerInfo(name, "joint", self.grid, 0, depth, place))
        return layers


def prompt_list(prompts: str | Sequence[str], backbone: str) -> list[str]:
    """``prompts`` as a non-empty list of strings (one string is one prompt), or an InputError."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("encode_text needs a non-empty list of strings", where=f"backbone {backbone}",
                         fix="pass prompts like ['a photo of cat, dog']")
    return prompts


# ----------------------------------------------------------------------------------- loading
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _present(model_index: dict[str, Any], component: str) -> bool:
    entry = model_index.get(component)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def check_layer_options(opts: dict[str, Any], where: str) -> dict[str, Any]:
    """``layer_defaults`` from the three layer-weight options of a single-group backbone."""
    def bad(key: str, msg: str, fix: str) -> ConfigError:
        return ConfigError(f"option '{key}' {msg}", where=where, fix=fix)

    if not _is_number(opts["cross_gaussian_sigma"]) or opts["cross_gaussian_sigma"] < 0:
        raise bad("cross_gaussian_sigma", f"must be a number >= 0, got {opts['cross_gaussian_sigma']!r}",
                  "use 0 (all layers per cross_weight) or a positive std over layer depth")
    cw = opts["cross_weight"]
    if cw is not None and (not isinstance(cw, (list, tuple)) or len(cw) != 1 or not _is_number(cw[0])):
        raise bad("cross_weight", f"must be a list of one number (one resolution group), got {cw!r}",
                  "use cross_weight: [1] or leave it out")
    sw = opts["self_weight"]
    if not isinstance(sw, (list, tuple)) or not sw or not all(
            isinstance(r, (list, tuple)) and len(r) == 1 and _is_number(r[0]) and r[0] > 0 for r in sw):
        raise bad("self_weight", f"must be a list of rows with one positive number each (one resolution group), "
                  f"got {sw!r}", "use self_weight: [[1], [1]]")
    return {
        "cross_weight": [float(cw[0])] if cw is not None else [1.0],
        "cross_gaussian_sigma": float(opts["cross_gaussian_sigma"]),
        "self_weight": [[float(r[0])] for r in sw],
    }


def check_common_options(opts: dict[str, Any], where: str) -> None:
    """``image_size``, ``offline``, ``revision``, ``t5_max_length``: the options every loader here shares."""
    size = opts["image_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ConfigError(f"option 'image_size' must be a positive integer or null, got {size!r}", where=where,
                          fix="use e.g. image_size: 1024, or leave it out to use the VAE's sample_size")
    if opts["offline"] is not None and not isinstance(opts["offline"], bool):
        raise ConfigError(f"option 'offline' must be true, false or null, got {opts['offline']!r}", where=where,
                          fix="use offline: true")
    if opts["revision"] is not None and not isinstance(opts["revision"], str):
        raise ConfigError(f"option 'revision' must be a string or null, got {opts['revision']!r}", where=where,
                          fix="use e.g. revision: main")
    if isinstance(opts["t5_max_length"], bool) or not isinstance(opts["t5_max_length"], int) \
            or not 0 < opts["t5_max_length"] <= 512:
        raise ConfigError(f"option 't5_max_length' must be an integer in 1..512, got {opts['t5_max_length']!r}",
                          where=where, fix="use the pipeline's max_sequence_length: 512 (FLUX.1-dev), 256 "
                          "(FLUX.1-schnell), 300 (PixArt-Sigma)")


def load_flux_backbone(spec: EntrySpec, device: str | torch.device = "cpu", dtype: str = "float32") -> FluxBackbone:
    """Load every part of a FLUX.1 diffusers folder (or hub id) named by a registry entry."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    from t2ialign.core.clip_tokenizer import clip_tokenizer

    opts = {**OPTIONS, **spec.options}
    where = spec.where
    check_common_options(opts, where)
    layer_defaults = check_layer_options(opts, where)
    guidance = opts["guidance"]
    if guidance is not None and not _is_number(guidance):
        raise ConfigError(f"option 'guidance' must be a number or null, got {guidance!r}", where=where,
                          fix="use guidance: 3.5 (FluxPipeline's default) or leave it out")
    offline = offline_mode(opts["offline"])
    common = dict(offline=offline, revision=opts["revision"])
    try:
        path = resolve_model_path(opts["model"], offline=offline)
    except ModelLoadError as exc:
        raise ModelLoadError(exc.what, where=where, fix=exc.fix) from exc
    model_dtype, vae_dtype = torch_dtype(dtype), torch_dtype(opts["vae_dtype"])
    dev = torch.device(device)

    index = read_json_config(path, "", "model_index.json", what="model_index.json", **common)
    needed = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer_2", "scheduler")
    missing = [c for c in needed if not _present(index, c)]
    if missing:
        raise ModelLoadError(
            f"{path} is not a FLUX.1 folder: model_index.json ({index.get('_class_name')}) lacks {missing}",
            where=where,
            fix="point 'model:' at a FluxPipeline folder (FLUX.1-dev / -schnell layout), or use the backbone "
            "plugin of that model family",
        )

    def load(cls: Any, sub: str, what: str, dt: torch.dtype | None) -> Any:
        return load_component(cls, path, sub, dtype=dt, what=what, **common)

    transformer = load(FluxTransformer2DModel, "transformer", "FLUX transformer", model_dtype)
    vae = load(AutoencoderKL, "vae", "VAE", vae_dtype)
    text_encoder = load(CLIPTextModel, "text_encoder", "CLIP text encoder", model_dtype)
    tokenizer = (load(CLIPTokenizer, "tokenizer", "CLIP tokenizer", None) if _present(index, "tokenizer")
                 else clip_tokenizer())
    text_encoder_2 = load(T5EncoderModel, "text_encoder_2", "T5 text encoder", model_dtype)
    tokenizer_2 = load(AutoTokenizer, "tokenizer_2", "T5 tokenizer", None)
    sched = read_json_config(path, "scheduler", "scheduler_config.json", what="scheduler config", **common)
    sched = dict(FlowMatchEulerDiscreteScheduler.from_config(sched).config)

    has_guidance = bool(transformer.config.get("guidance_embeds", False))
    if guidance is not None and not has_guidance:
        raise ConfigError(
            f"option 'guidance' is {guidance} but this transformer is not guidance-distilled (guidance_embeds "
            "is false, as for FLUX.1-schnell)", where=where, fix="remove the guidance option for this model")
    if guidance is None and has_guidance:
        guidance = DEFAULT_GUIDANCE

    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    image_size = opts["image_size"] or int(vae.config.sample_size)
    if image_size % (2 * vae_scale):
        raise ConfigError(f"image_size {image_size} does not fit FLUX (needs a multiple of {2 * vae_scale}: "
                          "VAE downsampling times the 2x2 latent packing)", where=where,
                          fix=f"set image_size to a multiple of {2 * vae_scale}, e.g. 1024")
    for module in (transformer, text_encoder, text_encoder_2, vae):
        module.to(dev).eval().requires_grad_(False)
    return FluxBackbone(
        name=spec.name, transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, scheduler_config=sched, device=dev,
        dtype=model_dtype, vae_dtype=vae_dtype, image_size=image_size, t5_max_length=opts["t5_max_length"],
        guidance=None if guidance is None else float(guidance), layer_defaults=layer_defaults,
    )


# ----------------------------------------------------------------------------------- hooks
@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(
        provides={"backbones": {PLUGIN_NAME: dict(OPTIONS)}},
        description="FLUX.1 dev/schnell (rectified flow with dynamic shift, double+single-stream MM-DiT, "
                    "CLIP pooled + T5 tokens)",
    )


@hookimpl
def t2ialign_make_backbone(spec: EntrySpec, device: str, dtype: str) -> FluxBackbone | None:
    if spec.plugin != PLUGIN_NAME:
        return None
    return load_flux_backbone(spec, device=device, dtype=dtype)


__all__ = ["FluxBackbone", "load_flux_backbone", "pack_latents", "unpack_latents", "OPTIONS", "PLUGIN_NAME"]
