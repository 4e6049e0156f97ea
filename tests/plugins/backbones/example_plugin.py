"""Worked example of a third-party backbone plugin (docs/backbones.md walks through it).

``sd_clip_skip``: a Stable-Diffusion-layout model whose text embeddings are taken ``clip_skip``
layers before the last one (what many community fine-tunes expect). Everything else -- loading,
VAE, schedule, attention layers -- is reused from the built-in plugin by subclassing.

A real package would declare it in its ``pyproject.toml``::

    [project.entry-points.t2ialign]
    sd_clip_skip = "my_package.sd_clip_skip"

and ship a registry file (hook ``t2ialign_registry_files``) or let users write one::

    backbones:
      my_model: {plugin: sd_clip_skip, model: /models/my-sd-finetune, clip_skip: 2}
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from t2ialign.core.errors import ConfigError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.protocols import TextCond
from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign.plugins.backbones import stable_diffusion as sd
from t2ialign.plugins.backbones.stable_diffusion import StableDiffusionBackbone

PLUGIN_NAME = "sd_clip_skip"
OPTIONS: dict[str, Any] = {**sd.OPTIONS, "clip_skip": 1}


class ClipSkipBackbone(StableDiffusionBackbone):
    """SD with text embeddings from ``hidden_states[-(clip_skip + 1)]`` (final layer norm applied)."""

    clip_skip: int = 1

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return dict(OPTIONS)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> TextCond:
        out = self.text_encoder(self._tokenize(self.tokenizer, prompts), output_hidden_states=True)
        hidden = out.hidden_states[-(self.clip_skip + 1)]
        # as diffusers does for clip_skip: the skipped layers' output still goes through the final
        # norm (transformers 5 keeps it on the model itself, 4.x under ``.text_model``)
        norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        hidden = norm(hidden)
        return TextCond(embeds=hidden.to(self.dtype))


@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"backbones": {PLUGIN_NAME: dict(OPTIONS)}},
                      description="example: Stable Diffusion with CLIP skip")


@hookimpl
def t2ialign_make_backbone(spec: EntrySpec, device: str, dtype: str) -> ClipSkipBackbone | None:
    if spec.plugin != PLUGIN_NAME:
        return None  # not ours: let other plugins answer
    clip_skip = int(spec.get("clip_skip", 1))
    if clip_skip < 0:
        raise ConfigError(f"clip_skip must be >= 0, got {clip_skip}", where=f"{spec.where}.clip_skip",
                          fix="use 0 (last layer), 1 (penultimate) ...")
    backbone = ClipSkipBackbone.from_spec(spec, device, dtype)
    backbone.clip_skip = clip_skip
    return backbone
