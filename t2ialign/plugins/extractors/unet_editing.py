"""Prompt-to-Prompt attention control for UNet denoisers, beside the UNet capture code.

Part of the ``unet_attention`` extractor plugin, whose hook ``t2ialign_make_attention_editor``
(in :mod:`t2ialign.plugins.extractors.unet`) hands :class:`AttentionEditController` to the
editing task for ``attention_kind == "unet"`` backbones. The controller puts an :class:`EditProcessor` on every cross and self layer (through
diffusers' ``Attention.set_processor``); while an edit is active the processor computes the
attention probabilities explicitly (:func:`_explicit_attention`) and lets the controller replace
the target rows' by the source rows' (rules: :mod:`t2ialign.plugins.tasks.editing`), otherwise it
delegates to the layer's original processor. Originals are restored on exit, also on errors.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from t2ialign.core.errors import ConfigError, PluginError
from t2ialign.core.attention_processors import DelegatingProcessor, attention_inputs


def _explicit_attention(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                        attention_mask: torch.Tensor | None, temb: torch.Tensor | None, edit) -> torch.Tensor:
    """One diffusers ``Attention`` call with materialised probabilities that ``edit`` may change.

    The same input/output transformations a standard processor applies (spatial norm, 4-D
    feature maps, group norm, cross-norm, per-head q/k norms, output projection, residual,
    rescale), with ``softmax(Q K^T * scale)`` computed in float32 and handed to
    ``edit(probs (B, heads, Q, K)) -> probs`` before it weights the values.
    """
    residual = hidden_states
    x, context, shape4d = attention_inputs(attn, hidden_states, encoder_hidden_states, temb)
    query, key, value = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    batch, heads = query.shape[0], attn.heads
    head_dim = key.shape[-1] // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    query, key, value = split(query), split(key), split(value)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scale
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
        scores = scores + mask.view(batch, heads, -1, mask.shape[-1]).float()
    probs = edit(torch.softmax(scores, dim=-1))
    out = (probs.to(value.dtype) @ value).transpose(1, 2).reshape(batch, -1, heads * head_dim)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if shape4d is not None:
        out = out.transpose(-1, -2).reshape(shape4d)
    if getattr(attn, "residual_connection", False):
        out = out + residual
    return out / getattr(attn, "rescale_output_factor", 1.0)


class EditProcessor(DelegatingProcessor):
    """Attention processor of one layer: explicit, edited attention while the controller asks for
    it, the layer's original processor otherwise (so untouched steps are bit-identical)."""

    def __init__(self, inner: Any, controller: "AttentionEditController", kind: str, name: str) -> None:
        super().__init__(inner)
        self.controller = controller
        self.kind = kind
        self.name = name

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        queries = hidden_states.shape[-1] * hidden_states.shape[-2] if hidden_states.ndim == 4 else hidden_states.shape[1]
        if self.controller.wants(self.kind, int(queries)):
            return _explicit_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                       lambda p: self.controller.edit(self.kind, self.name, p))
        return self.delegate(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)


class AttentionEditController:
    """Prompt-to-Prompt attention replacement for (source row, target row) pairs of a batch.

    ``steps``: sampling steps; the edit is active while ``step < int(fraction * steps)``, with
    ``step`` set by the caller before each denoiser call (no layer counting). ``token_map``:
    :attr:`PromptAlignment.mapping`. ``pairs``: ``(source_row, target_row)`` in the denoiser
    batch; ``batch``: the batch size the pairs refer to (a call with another batch size is an
    error, never a silent mis-edit). ``record``: keep every edited call's probabilities before
    and after the edit in :attr:`records` (tests, debugging; memory grows per call).
    ``column_replace_steps``: per target token position, its own cross-replace fraction
    (Prompt-to-Prompt's per-word schedules; positions not in it use ``cross_replace_steps``).
    ``reweight``: per target token position, a factor on the target row's cross-attention
    probabilities at every step (Prompt-to-Prompt's reweighting; factor 1 changes nothing).
    """

    def __init__(self, *, steps: int, cross_replace_steps: float, self_replace_steps: float,
                 token_map: torch.Tensor, pairs: Sequence[tuple[int, int]], batch: int,
                 self_replace_max_tokens: int | None = 1024, record: bool = False,
                 column_replace_steps: dict[int, float] | None = None,
                 reweight: dict[int, float] | None = None) -> None:
        fractions = [("cross_replace_steps", cross_replace_steps), ("self_replace_steps", self_replace_steps)]
        fractions += [(f"word_replace_steps (token {c})", f) for c, f in (column_replace_steps or {}).items()]
        for key, frac in fractions:
            if not 0.0 <= float(frac) <= 1.0:
                raise ConfigError(f"{key} must be a fraction of the steps in [0, 1], got {frac}",
                                  where=f"config key {key.split(' ')[0]}", fix=f"use e.g. {key.split(' ')[0]}=0.4")
        for col, factor in (reweight or {}).items():
            if not (math.isfinite(float(factor)) and float(factor) >= 0):
                raise ConfigError(f"reweight factor {factor!r} (token {col}) must be finite and >= 0",
                                  where="config key reweight", fix="use e.g. reweight={blue: 2.0}")
        self.steps = int(steps)
        self.cross_until = int(float(cross_replace_steps) * self.steps)
        self.self_until = int(float(self_replace_steps) * self.steps)
        self.self_max_tokens = self_replace_max_tokens
        tgt = torch.nonzero(token_map >= 0).flatten()
        self.target_cols = tgt
        self.source_cols = token_map[tgt]
        per_col = column_replace_steps or {}
        # the step before which each aligned target column takes the source's attention
        self.column_until = torch.tensor([int(float(per_col.get(int(c), cross_replace_steps)) * self.steps)
                                          for c in tgt.tolist()], dtype=torch.long)
        self.reweight_cols = torch.tensor(sorted(int(c) for c in (reweight or {})), dtype=torch.long)
        self.reweight_factors = torch.tensor([float((reweight or {})[int(c)]) for c in self.reweight_cols.tolist()],
                                             dtype=torch.float32)
        self.pairs = [(int(s), int(t)) for s, t in pairs]
        self.batch = int(batch)
        self.record = record
        self.records: list[dict[str, Any]] = []
        self.step = 0
        self.layers = 0

    def wants(self, kind: str, queries: int) -> bool:
        if kind == "cross":
            return bool(len(self.reweight_cols)) or (
                bool(len(self.column_until)) and self.step < int(self.column_until.max()))
        if self.self_max_tokens is not None and queries > self.self_max_tokens:
            return False
        return self.step < self.self_until

    def edit(self, kind: str, name: str, probs: torch.Tensor) -> torch.Tensor:
        """Replace the target rows' probabilities ``(B, heads, Q, K)`` by the source rows' (the
        aligned columns still in their replace schedule, for cross layers), then reweight."""
        if probs.shape[0] != self.batch:
            raise PluginError(
                f"attention edit expected a batch of {self.batch} rows, layer {name} got {probs.shape[0]}",
                where="AttentionEditController",
                fix="the editor relies on the sampler's row order [uncond..., cond...]; "
                    "check t2ialign.core.sampling.sample",
            )
        before = probs.detach().clone() if self.record else None
        out = probs.clone()
        active = self.column_until > self.step
        cols_t = self.target_cols[active].to(probs.device)
        cols_s = self.source_cols[active].to(probs.device)
        for s, t in self.pairs:
            if kind == "cross":
                out[t][..., cols_t] = probs[s][..., cols_s]
                if len(self.reweight_cols):
                    cols = self.reweight_cols.to(probs.device)
                    out[t][..., cols] = out[t][..., cols] * self.reweight_factors.to(probs.device, probs.dtype)
            else:
                out[t] = probs[s]
        if self.record:
            self.records.append({"step": self.step, "kind": kind, "name": name, "before": before.cpu(),
                                 "after": out.detach().cpu()})
        return out

    @contextmanager
    def installed(self, backbone: Any) -> Iterator["AttentionEditController"]:
        """Put an :class:`EditProcessor` on every cross and self layer; restore the originals on exit."""
        kind = getattr(backbone, "attention_kind", None)
        if kind != "unet":  # the hook only hands this controller out for UNets; a direct caller may not know
            raise PluginError(
                f"UNet attention editing is not supported on backbone '{getattr(backbone, 'name', '?')}', whose "
                f"attention is '{kind}'", where="unet_attention",
                fix="ask t2ialign_make_attention_editor (Host.attention_editor) for the backbone's controller")
        layers = [l for l in backbone.attention_layers() if l.kind in ("cross", "self")]
        if not any(l.kind == "cross" for l in layers):
            raise PluginError(f"backbone '{backbone.name}' reports no cross-attention layers", where="editing",
                              fix="check the backbone plugin's attention_layers()")
        modules = dict(backbone.denoiser.named_modules())
        originals: dict[str, Any] = {}
        try:
            for layer in layers:
                module = modules[layer.name]
                originals[layer.name] = module.get_processor() if hasattr(module, "get_processor") else module.processor
                module.set_processor(EditProcessor(originals[layer.name], self, layer.kind, layer.name))
            self.layers = len(originals)
            yield self
        finally:
            for name, processor in originals.items():
                modules[name].set_processor(processor)

