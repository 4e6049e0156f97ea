"""Stable Diffusion XL as a t2ialign backbone.

Everything but the text side is Stable Diffusion's (:class:`StableDiffusionBackbone`): same VAE,
DDPM schedule, UNet attention layout. The text side follows SDXL: two CLIP encoders
(``CLIPTextModel`` and ``CLIPTextModelWithProjection``; the second tokenizer pads with ``"!"``),
their *penultimate* hidden states concatenated on the feature axis, the pooled embedding from
encoder 2, and micro-conditioning ``time_ids = (S, S, 0, 0, S, S)`` (original size, crop
top-left, target size at the square working size ``S``) as the reference does.

Default layer weights: SDXL's cross layers fall in only 3 resolution groups (64, 32, 64 at
1024 px: down32, mid32 and up32 share a grid), so SD's 7-group ``cross_weight`` does not apply.
We default to the Gaussian over depth (``cross_gaussian_sigma: 3.0``, the released run
template's setting, centred on the mid block) with ``cross_weight: [1, 1, 1]`` as the per-group
fallback when sigma is 0, and ``self_weight: [[1, 0, 1], [0, 0, 1]]`` -- the SD default's intent
(first step: all highest-resolution self layers; second step: the up-path ones) mapped to 3
groups, which avoids the all-zero row (NaN) the reference's SD default gives on SDXL.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from t2ialign.core.errors import InputError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.protocols import TextCond
from t2ialign.core.specs import EntrySpec
from t2ialign.plugins.backbones import stable_diffusion as sd
from t2ialign.plugins.backbones.common import backbone_info_hook, load_component
from t2ialign.plugins.backbones.stable_diffusion import StableDiffusionBackbone, load_tokenizer

PLUGIN_NAME = "stable_diffusion_xl"

#: registry options: Stable Diffusion's, with SDXL's layer-weight defaults (see the module docstring)
OPTIONS: dict[str, Any] = {
    **sd.OPTIONS,
    "cross_weight": [1, 1, 1],
    "cross_gaussian_sigma": 3.0,
    "self_weight": [[1, 0, 1], [0, 0, 1]],
}


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    """SDXL: :class:`StableDiffusionBackbone` with two text encoders and text-time conditioning.

    Extra attributes: ``text_encoder_2``, ``tokenizer_2``.
    """

    def __init__(self, *, text_encoder_2: Any, tokenizer_2: Any, **kwargs: Any) -> None:
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        super().__init__(**kwargs)

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return dict(OPTIONS)

    @classmethod
    def _load_text_parts(cls, path: str, dtype: torch.dtype, *, offline: bool,
                         revision: str | None) -> dict[str, Any]:
        from transformers import CLIPTextModelWithProjection

        parts = super()._load_text_parts(path, dtype, offline=offline, revision=revision)
        parts["text_encoder_2"] = load_component(CLIPTextModelWithProjection, path, "text_encoder_2", dtype=dtype,
                                                 what="second text encoder", offline=offline, revision=revision)
        parts["tokenizer_2"] = load_tokenizer(path, "tokenizer_2", offline=offline, revision=revision,
                                              pad_token="!")
        return parts

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> TextCond:
        """Penultimate hidden states of both encoders concatenated; pooled and time ids in the cond."""
        hidden = []
        pooled = None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(self._tokenize(tokenizer, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # encoder 2 (with projection) runs last: its projected text embedding
        embeds = torch.cat(hidden, dim=-1).to(self.dtype)
        size = float(self.image_size)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=self.device, dtype=self.dtype)
        return TextCond(
            embeds=embeds,
            pooled=pooled.to(self.dtype),  # type: ignore[union-attr]
            extra={"time_ids": time_ids.expand(embeds.shape[0], -1).clone()},
        )

    def _added_cond(self, cond: TextCond) -> dict[str, Any]:
        if cond.pooled is None or "time_ids" not in cond.extra:
            raise InputError("SDXL needs pooled text embeddings and time_ids in the text condition",
                             where=f"backbone {self.name}", fix="encode prompts with this backbone's encode_text")
        return {
            "text_embeds": cond.pooled.to(self.device, self.dtype),
            "time_ids": cond.extra["time_ids"].to(self.device, self.dtype),
        }


t2ialign_plugin_info = backbone_info_hook(
    PLUGIN_NAME, OPTIONS, "Stable Diffusion XL (UNet + two CLIP text encoders + VAE) from a folder or hub id")


@hookimpl
def t2ialign_make_backbone(spec: EntrySpec, device: str, dtype: str) -> StableDiffusionXLBackbone | None:
    return StableDiffusionXLBackbone.from_spec(spec, device, dtype) if spec.plugin == PLUGIN_NAME else None

