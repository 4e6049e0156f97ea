"""Attention capture for UNet denoisers (SD 1.x/2.x, SDXL and any ``attention_kind == "unet"`` backbone).

diffusers' default processors call fused ``scaled_dot_product_attention`` and never materialise
attention probabilities. For the layers a caller asks for, this extractor swaps in a thin
processor (:class:`CaptureProcessor`, through ``Attention.set_processor``, diffusers' public API) that

1. recomputes ``softmax(Q K^T * scale)`` from the module's own ``to_q`` / ``to_k`` (after the
   same input normalisations the default processor applies), head-averages it in chunks of heads
   and adds it to an :class:`~t2ialign.core.attention_store.AttentionStore`;
2. hands the call unchanged to the layer's *original* processor object, which computes the
   output -- so outputs are identical with and without capture.

With ``store.self_maps == "fused"`` self layers skip step 1: the processor keeps the per-head
(normalised) q/k the original processor computed anyway (``store.add_factors``), and propagation
later applies the averaged map to the class maps as one attention product
(:class:`~t2ialign.core.attention_store.SelfAttentionFactors`), so no ``Q x Q`` map is formed.

Every other layer keeps its original (fused) processor. Original processors are restored when
the ``with`` block exits, also on exceptions.

The generic pieces this builds on (input transformations, explicit probabilities from the
projections, delegating and q/k-recording processors and their installation) live in
:mod:`t2ialign.core.attention_processors`, shared with the editing controller and the toy
grounding loss.

The same plugin answers ``t2ialign_make_attention_editor`` for UNets: Prompt-to-Prompt attention
control lives beside this capture code, in :mod:`t2ialign.plugins.extractors.unet_editing`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from t2ialign.core.attention_processors import (
    ProjectionRecorder,
    attention_inputs,
    attention_probs,
    head_factors,
    probs_from_projections,
    recorders_installed,
)
from t2ialign.core.attention_store import AttentionStore
from t2ialign.core.errors import PluginError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.specs import EntrySpec, PluginInfo

if TYPE_CHECKING:
    from t2ialign.core.protocols import Backbone

PLUGIN = "unet_attention"
#: extractor options: ``chunk_mb`` bounds the float32 logits block computed at once
#: (null = 8 MB on a CPU, 256 MB on a GPU: see :func:`~t2ialign.core.attention_processors.block_bytes_for`)
OPTIONS: dict[str, Any] = {"chunk_mb": None}


class CaptureProcessor(ProjectionRecorder):
    """Records the probabilities of one layer while the layer's original processor runs.

    Capturing costs only the explicit softmax of the requested columns (recomputing the
    projections made capture ~25% of a forward on small UNets). A processor that does not call
    both projections (fused ``to_qkv``/``to_kv``, custom ones) is handled by recomputing them,
    with the same result.
    """

    def __init__(self, inner: Any, store: AttentionStore, kind: str, name: str,
                 columns: torch.Tensor | None, chunk_bytes: int | None) -> None:
        super().__init__(inner)
        self.store = store
        self.kind = kind
        self.name = name
        self.columns = columns
        self.chunk_bytes = chunk_bytes

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        columns = self.columns if self.kind == "cross" else None
        out, seen = self.delegate_and_record(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        if self.kind == "self" and self.store.fused:
            with torch.no_grad():
                if "q" not in seen or "k" not in seen:
                    x, context, _ = attention_inputs(attn, hidden_states, encoder_hidden_states, temb)
                    seen = {"q": attn.to_q(x), "k": attn.to_k(context)}
                query, key = head_factors(attn, seen["q"], seen["k"])
            self.store.add_factors(self.name, query, key, scale=attn.scale,
                                   half_ok=not getattr(attn, "upcast_attention", False))
            return out
        with torch.no_grad():
            if "q" in seen and "k" in seen:
                probs = probs_from_projections(attn, seen["q"], seen["k"], columns=columns,
                                               chunk_bytes=self.chunk_bytes)
            else:
                probs = attention_probs(attn, hidden_states, encoder_hidden_states, temb, columns=columns,
                                        chunk_bytes=self.chunk_bytes)
        # the store averages over dim 1 (heads); the map is already head-averaged
        self.store.add(self.kind, self.name, probs.unsqueeze(1))
        return out


class UNetAttentionExtractor:
    """Captures cross/self attention maps of a UNet backbone's ``denoiser``."""

    def __init__(self, backbone: Backbone, chunk_mb: float | None = None) -> None:
        self.backbone = backbone
        self.chunk_bytes = None if chunk_mb is None else int(float(chunk_mb) * 2**20)

    def _select(self, kind: str, requested: Sequence[str] | None,
                available: list[str]) -> list[str]:
        if requested is None:
            return list(available)
        requested = list(requested)
        unknown = [n for n in requested if n not in available]
        if unknown:
            raise PluginError(
                f"unknown {kind}-attention layer(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} requested",
                where=f"backbone {getattr(self.backbone, 'name', '?')}",
                fix=f"use names from backbone.attention_layers(); {kind} layers are e.g. {available[:3]} "
                f"({len(available)} in all)",
            )
        return requested

    @contextmanager
    def capture(
        self,
        *,
        cross_layers: Sequence[str] | None = None,
        self_layers: Sequence[str] | None = None,
        token_indices: Sequence[int] | None = None,
        keep_steps: bool = False,
    ) -> Iterator[AttentionStore]:
        """Install capturing processors on the requested layers; yields the store.

        ``None`` = every layer of that kind, ``[]`` = none of that kind. ``token_indices``
        restricts cross maps to those text positions (in the given order).
        """
        layers = self.backbone.attention_layers()
        cross = self._select("cross", cross_layers, [l.name for l in layers if l.kind == "cross"])
        selfs = self._select("self", self_layers, [l.name for l in layers if l.kind == "self"])
        if not cross and not selfs:
            raise PluginError(
                "no attention layer would be hooked (both cross_layers and self_layers are empty)",
                where=f"backbone {getattr(self.backbone, 'name', '?')}",
                fix=f"request some of the {len(layers)} layers of backbone.attention_layers() "
                "(None means all of a kind)",
            )
        columns = None
        if token_indices is not None:
            columns = torch.as_tensor(list(token_indices), dtype=torch.long)
            max_tokens = getattr(self.backbone, "max_tokens", None)
            if columns.numel() == 0 or (columns < 0).any() or (max_tokens and (columns >= max_tokens).any()):
                raise PluginError(f"token_indices {list(token_indices)} are empty or outside 0..{max_tokens}",
                                  fix="use backbone.token_spans(prompt, phrase) to get positions")
            # once per capture, not per layer call: a CPU->GPU copy in every layer synchronises the
            # stream each time, which made cross-only capture 1.38x a forward on an H200 (gpu.py)
            columns = columns.to(getattr(self.backbone, "device", None) or "cpu")
        store = AttentionStore(keep_steps=keep_steps)
        store.hooked = {"cross": len(cross), "self": len(selfs)}
        modules = dict(self.backbone.denoiser.named_modules())
        kinds = {**{name: "cross" for name in cross}, **{name: "self" for name in selfs}}
        with recorders_installed(
            {name: modules[name] for name in kinds},
            lambda name, inner: CaptureProcessor(inner, store, kinds[name], name, columns, self.chunk_bytes),
        ):
            yield store


@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(
        provides={"extractors": {PLUGIN: dict(OPTIONS)}},
        description="explicit cross/self attention probabilities of UNet denoisers via diffusers attention processors",
    )


@hookimpl
def t2ialign_make_attention_extractor(backbone: Backbone, spec: EntrySpec) -> UNetAttentionExtractor | None:
    if spec.plugin not in ("auto", PLUGIN) or getattr(backbone, "attention_kind", None) != "unet":
        return None
    chunk_mb = spec.get("chunk_mb", OPTIONS["chunk_mb"])
    if chunk_mb is not None and not (isinstance(chunk_mb, (int, float)) and chunk_mb >= 0):
        raise PluginError(f"extractor option chunk_mb must be a number of megabytes >= 0 or null, got {chunk_mb!r}",
                          where=f"extractor entry '{spec.name}'", fix="e.g. chunk_mb: 64, or leave it out (auto)")
    return UNetAttentionExtractor(backbone, chunk_mb=chunk_mb)


@hookimpl
def t2ialign_make_attention_editor(backbone: Any) -> Callable[..., Any] | None:
    """Prompt-to-Prompt controllers for UNet backbones (:mod:`.unet_editing`, imported on demand:
    capture alone never needs it)."""
    if getattr(backbone, "attention_kind", None) != "unet":
        return None
    from t2ialign.plugins.extractors.unet_editing import AttentionEditController

    return AttentionEditController
