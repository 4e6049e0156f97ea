"""PixArt-Sigma backbone (``plugin: pixart_sigma``): an epsilon-prediction DiT with T5 cross-attention.

PixArt-Sigma is a DDPM-family latent diffusion model like SD (same ``alphas_cumprod`` schedule
logic, same VAE conventions), so :class:`PixArtSigmaBackbone` subclasses t2ialign's
:class:`~t2ialign.plugins.backbones.stable_diffusion.StableDiffusionBackbone` for the schedule,
``add_noise``, ``encode_image`` and ``decode_latents``, and replaces what differs:

- text: a T5 encoder run with its attention mask (``max_sequence_length`` 300), as
  ``PixArtSigmaPipeline.encode_prompt(..., clean_caption=False)`` (the pipeline's optional caption
  cleaning needs bs4/ftfy and is not applied); class-token positions are T5 positions;
- the denoiser: ``PixArtTransformer2DModel``, whose output has twice the latent channels (the
  learned variance, "learned sigma"); ``predict`` returns the epsilon half, as the pipeline does;
- attention: every block's ``attn1`` (image self-attention) and ``attn2`` (image -> T5 tokens) are
  standard diffusers ``Attention`` modules, so ``attention_kind = "unet"`` and t2ialign's built-in
  extractor hooks them unchanged.

The T5 padding is masked in the model (``encoder_attention_mask``). ``predict`` drops the padding
columns every row of the batch masks (a masked key gets ``exp(-10000) = 0`` weight, so the output
is the same) and passes the mask for the rest. With one prompt per batch -- how t2ialign collects
attention -- no masked column is left, so the captured cross-attention maps are exactly the
model's; rows of a mixed-length batch would still see their remaining padding columns in a
captured map (the built-in extractor ignores attention masks).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from t2ialign.core.errors import ConfigError, InputError, ModelLoadError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.protocols import LayerInfo, TextCond
from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign.core.tokens import find_token_span
from t2ialign.plugins.backbones.common import (
    load_component,
    offline_mode,
    read_json_config,
    resolve_model_path,
    torch_dtype,
)
from t2ialign.plugins.backbones.stable_diffusion import StableDiffusionBackbone
from t2ialign_flux.flux import check_common_options, check_layer_options, prompt_list

PLUGIN_NAME = "pixart_sigma"

OPTIONS: dict[str, Any] = {
    "model": "",
    "revision": None,
    "image_size": None,  # None: the transformer's sample_size times the VAE factor (1024 for the 1024-MS model)
    "offline": None,
    "t5_max_length": 300,  # PixArtSigmaPipeline's max_sequence_length
    # untuned defaults: every layer counts the same (no reference setting exists for PixArt)
    "cross_gaussian_sigma": 0.0,
    "cross_weight": None,
    "self_weight": [[1], [1]],
    "vae_dtype": "float32",
}


class PixArtSigmaBackbone(StableDiffusionBackbone):
    """A ``PixArtSigmaPipeline`` checkpoint as a t2ialign backbone (see the module docstring)."""

    attention_kind = "unet"

    def __init__(self, *, transformer: torch.nn.Module, t5_max_length: int, **kwargs: Any):
        super().__init__(unet=transformer, **kwargs)
        self.transformer = transformer
        self.max_tokens = int(t5_max_length)
        patch = int(transformer.config.patch_size)
        if self.latent_size % patch:
            raise ConfigError(f"image_size {self.image_size} does not fit this transformer (the latent side "
                              f"{self.latent_size} must be a multiple of the patch size {patch})",
                              where=f"backbones.{self.name}.image_size",
                              fix=f"use a multiple of {patch * self.vae_scale_factor}")
        side = self.latent_size // patch
        self.grid: tuple[int, int] = (side, side)
        #: the transformer predicts [epsilon, variance] when it has twice the latent channels
        self.learned_sigma = int(transformer.config.out_channels) == 2 * int(transformer.config.in_channels)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> TextCond:
        """T5 last hidden states ``(B, t5_max_length, D)`` with ``extra["mask"]`` (1 = token, 0 = padding)."""
        prompts = prompt_list(prompts, self.name)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return TextCond(embeds=hidden.to(self.dtype), extra={"mask": mask})

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        """Epsilon at ``(z_t, t)``, float32 (the learned-variance half of the output is dropped)."""
        batch = z_t.shape[0]
        if len(cond) == 1 and batch > 1:
            cond = cond.select([0] * batch)
        if len(cond) != batch:
            raise InputError(f"{len(cond)} text conditions for {batch} latents", where=f"backbone {self.name}.predict",
                             fix="pass one condition per latent (TextCond.select can repeat rows) or a single one")
        mask = cond.extra.get("mask")
        if mask is None:
            raise InputError("PixArt needs the T5 attention mask (TextCond.extra['mask'] is missing)",
                             where=f"backbone {self.name}.predict", fix="build cond with encode_text")
        t = self._check_t(torch.as_tensor(t, dtype=torch.float32).reshape(-1)).to(torch.float32)
        t = (t.expand(batch) if t.numel() == 1 else t).to(self.device)
        # T5 pads at the end: drop the columns no row of this batch attends to
        keep = max(1, int(mask.sum(dim=1).max()))
        out = self.transformer(
            z_t.to(self.device, self.dtype),
            encoder_hidden_states=cond.embeds[:, :keep].to(self.device, self.dtype),
            encoder_attention_mask=mask[:, :keep].to(self.device),
            timestep=t,
            # what PixArtSigmaPipeline passes: Sigma has no resolution micro-conditioning
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
        if self.learned_sigma:
            out = out.chunk(2, dim=1)[0]
        return out.float()

    def token_spans(self, prompt: str, phrase: str) -> list[int]:
        """Positions of ``phrase``'s T5 tokens (no BOS: position 0 is the prompt's first token)."""
        return find_token_span(self.tokenizer, prompt, phrase, max_tokens=self.max_tokens)

    def attention_layers(self) -> list[LayerInfo]:
        """Each block's ``attn1`` (kind ``self``) and ``attn2`` (kind ``cross``): one token grid, one group."""
        layers = []
        for i, _ in enumerate(self.transformer.transformer_blocks):
            layers.append(LayerInfo(f"transformer_blocks.{i}.attn1", "self", self.grid, 0, i, "block"))
            layers.append(LayerInfo(f"transformer_blocks.{i}.attn2", "cross", self.grid, 0, i, "block"))
        return layers


def load_pixart_backbone(spec: EntrySpec, device: str | torch.device = "cpu",
                         dtype: str = "float32") -> PixArtSigmaBackbone:
    """Load every part of a PixArt-Sigma diffusers folder (or hub id) named by a registry entry."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    opts = {**OPTIONS, **spec.options}
    where = spec.where
    check_common_options(opts, where)
    layer_defaults = check_layer_options(opts, where)
    offline = offline_mode(opts["offline"])
    common = dict(offline=offline, revision=opts["revision"])
    try:
        path = resolve_model_path(opts["model"], offline=offline)
    except ModelLoadError as exc:
        raise ModelLoadError(exc.what, where=where, fix=exc.fix) from exc
    index = read_json_config(path, "", "model_index.json", what="model_index.json", **common)
    missing = [c for c in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
               if not (isinstance(index.get(c), (list, tuple)) and len(index[c]) == 2 and index[c][1])]
    if missing or "PixArt" not in str(index.get("_class_name", "")):
        raise ModelLoadError(
            f"{path} is not a PixArt folder: model_index.json ({index.get('_class_name')}) lacks {missing or 'nothing'}",
            where=where, fix="point 'model:' at a PixArtSigmaPipeline folder (e.g. PixArt-Sigma-XL-2-1024-MS)")
    model_dtype, vae_dtype = torch_dtype(dtype), torch_dtype(opts["vae_dtype"])
    dev = torch.device(device)
    scheduler_config = read_json_config(path, "scheduler", "scheduler_config.json", what="scheduler config", **common)
    prediction = scheduler_config.get("prediction_type") or "epsilon"
    if prediction not in ("epsilon", "v_prediction"):
        raise ConfigError(f"scheduler prediction_type {prediction!r} is not supported", where=where,
                          fix="use a PixArt checkpoint trained for epsilon (or v) prediction")

    def load(cls: Any, sub: str, what: str, dt: torch.dtype | None) -> Any:
        return load_component(cls, path, sub, dtype=dt, what=what, **common)

    transformer = load(PixArtTransformer2DModel, "transformer", "PixArt transformer", model_dtype)
    vae = load(AutoencoderKL, "vae", "VAE", vae_dtype)
    text_encoder = load(T5EncoderModel, "text_encoder", "T5 text encoder", model_dtype)
    tokenizer = load(AutoTokenizer, "tokenizer", "T5 tokenizer", None)
    if getattr(transformer, "use_additional_conditions", False):
        raise ModelLoadError(
            f"{path}: the transformer uses resolution/aspect-ratio micro-conditioning (a PixArt-alpha "
            "checkpoint), which this plugin does not provide", where=where,
            fix="use a PixArt-Sigma checkpoint (e.g. PixArt-alpha/PixArt-Sigma-XL-2-1024-MS)")
    for module in (transformer, vae, text_encoder):
        module.to(dev).eval().requires_grad_(False)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    image_size = opts["image_size"] or int(transformer.config.sample_size) * vae_scale
    return PixArtSigmaBackbone(
        name=spec.name, transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler_config=scheduler_config, prediction_type=prediction, image_size=image_size, device=dev,
        dtype=model_dtype, layer_defaults=layer_defaults, t5_max_length=opts["t5_max_length"],
    )


@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"backbones": {PLUGIN_NAME: dict(OPTIONS)}},
                      description="PixArt-Sigma (epsilon DiT with learned sigma, T5 cross-attention)")


@hookimpl
def t2ialign_make_backbone(spec: EntrySpec, device: str, dtype: str) -> PixArtSigmaBackbone | None:
    if spec.plugin != PLUGIN_NAME:
        return None
    return load_pixart_backbone(spec, device=device, dtype=dtype)


__all__ = ["PixArtSigmaBackbone", "load_pixart_backbone", "OPTIONS", "PLUGIN_NAME"]
