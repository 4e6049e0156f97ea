"""Attention capture for MM-DiT transformers (SD3 / SD3.5): joint image+text attention, split.

An MM-DiT block attends once over the concatenation ``[image tokens; text tokens]``, with separate
q/k/v projections (and RMS q/k norms on SD3.5) for the two streams. The probabilities of image
queries over that joint key axis hold both maps the method needs:

- cross = ``P[:, :, :img_len, img_len + token_indices]`` (image -> chosen text tokens),
- self  = ``P[:, :, :img_len, :img_len]`` (image -> image),

both *not* renormalised after the split, as in the reference code. SD3.5's extra image-only
``attn2`` gives a self map only.

diffusers computes attention with fused SDPA, so probabilities never exist. The capturing
processor installed here recomputes ``softmax(q k^T * scale)`` for the image query rows of the
requested layers only, stores head-averaged blocks into an
:class:`~t2ialign.core.attention_store.AttentionStore`, and then calls the layer's ORIGINAL
processor, so the model output is exactly what it would be without capture. Layers that were not
requested keep their processor untouched.

With ``store.self_maps == "fused"`` the image->image block is not formed: the processor keeps the
image queries and the joint keys (``store.add_factors`` with the text keys marked as carrying no
value), and propagation applies ``softmax(q [k_img; k_txt]^T * scale) @ [V; 0]`` -- exactly the
un-renormalised block times ``V`` -- through fused SDPA. Cross maps are still explicit (only the
kept text columns are stored).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from t2ialign.core.attention_store import AttentionStore
from t2ialign.core.errors import InputError, PluginError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.specs import EntrySpec, PluginInfo

if TYPE_CHECKING:
    from t2ialign.core.protocols import Backbone

PLUGIN_NAME = "mmdit_attention"
#: largest number of logits materialised at once (rows x heads x queries x keys); 2**27 fp32 = 512 MiB
DEFAULT_CHUNK_ELEMENTS = 2**27


def _heads(attn: Any, x: torch.Tensor, proj: Any, norm: Any) -> torch.Tensor:
    """``(B, N, heads * d)`` -> projected, per-head, normalised ``(B, heads, N, d)`` in float32."""
    y = proj(x)
    batch, n, inner = y.shape
    y = y.view(batch, n, attn.heads, inner // attn.heads).transpose(1, 2)
    if norm is not None:
        y = norm(y)
    # softmax over thousands of keys in fp16 loses the small probabilities the maps are made of
    return y.float()


def joint_factors(attn: Any, hidden_states: torch.Tensor,
                  encoder_hidden_states: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image queries ``(B, heads, img_len, d)`` and joint keys ``(B, heads, img_len + txt_len, d)``
    (``[k_img; k_txt]``, diffusers' order), normalised, float32."""
    with torch.no_grad():
        q = _heads(attn, hidden_states, attn.to_q, attn.norm_q)
        k = _heads(attn, hidden_states, attn.to_k, attn.norm_k)
        if encoder_hidden_states is not None:
            k_txt = _heads(attn, encoder_hidden_states, attn.add_k_proj, getattr(attn, "norm_added_k", None))
            k = torch.cat([k, k_txt], dim=2)
    return q, k


def image_query_probs(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Head-averaged attention probabilities of the image queries over the joint key axis.

    Returns ``(B, img_len, img_len + txt_len)`` float32 (``txt_len = 0`` for image-only layers):
    row ``i`` is the mean over heads of ``softmax(q_i K^T * attn.scale)`` with ``K = [k_img; k_txt]``
    in the order diffusers' joint processor concatenates them. Computed in chunks of batch rows
    and heads so at most ``max_chunk_elements`` logits exist at once. ``factors``: the
    :func:`joint_factors` of this call, if already computed.
    """
    with torch.no_grad():
        q, k = factors if factors is not None else joint_factors(attn, hidden_states, encoder_hidden_states)
        batch, heads, n_q, _ = q.shape
        n_k = k.shape[2]
        per_head = n_q * n_k
        step = max(1, min(heads, max_chunk_elements // max(per_head, 1)))
        out = torch.zeros(batch, n_q, n_k, dtype=torch.float32, device=q.device)
        for b in range(batch):
            for h in range(0, heads, step):
                logits = q[b, h : h + step] @ k[b, h : h + step].transpose(-1, -2) * attn.scale
                out[b] += logits.softmax(dim=-1).sum(dim=0)
        return out / heads


class JointCaptureProcessor:
    """Wraps one ``Attention`` module's processor: record probabilities, then run the original.

    ``want_cross`` stores the image->text block restricted to ``token_indices`` (``None`` = all
    text columns) under kind ``"cross"``; ``want_self`` stores the image->image block under kind
    ``"self"``; both under this layer's name.

    Note: diffusers passes a processor only the keyword arguments its ``__call__`` names; like
    ``JointAttnProcessor2_0`` this one names no extra argument (only ``**kwargs``), so SD3
    forwards see the same arguments with or without capture.
    """

    def __init__(
        self,
        original: Any,
        name: str,
        store: AttentionStore,
        *,
        want_cross: bool,
        want_self: bool,
        token_indices: Sequence[int] | None,
        max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ):
        self.original = original
        self.name = name
        self.store = store
        self.want_cross = want_cross
        self.want_self = want_self
        self.token_indices = None if token_indices is None else list(token_indices)
        self.max_chunk_elements = max_chunk_elements
        self._index_cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _column_index(self, cols: list[int], img_len: int, device: torch.device) -> torch.Tensor:
        """Positions of the kept text columns in the joint sequence, made once per device and image
        length: building them from a list in every call was a CPU->GPU copy, i.e. a stream sync per
        layer per forward."""
        key = (img_len, device)
        if key not in self._index_cache:
            self._index_cache[key] = torch.tensor(cols, dtype=torch.long, device=device) + img_len
        return self._index_cache[key]

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        self._record(attn, hidden_states, encoder_hidden_states)
        return self.original(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )

    def _record(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> None:
        img_len = hidden_states.shape[1]
        txt_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        cols = None
        if self.want_cross:
            if txt_len == 0:
                raise PluginError(
                    f"layer {self.name} got no text tokens, so it has no cross-attention map",
                    where="mmdit_attention",
                    fix="request only joint layers (kind 'joint' in attention_layers()) as cross layers",
                )
            cols = list(range(txt_len)) if self.token_indices is None else self.token_indices
            if cols and (min(cols) < 0 or max(cols) >= txt_len):
                raise InputError(
                    f"token index {max(cols) if max(cols) >= txt_len else min(cols)} is outside the "
                    f"{txt_len} text tokens of layer {self.name}",
                    where="capture(token_indices=...)",
                    fix="use positions from backbone.token_spans(prompt, phrase)",
                )
        factors = joint_factors(attn, hidden_states, encoder_hidden_states)
        fused_self = self.want_self and self.store.fused
        if fused_self:
            # the explicit path keeps the image block of these softmax rows; SDPA with zero values
            # on the text keys gives that block times V (float32 logits, as the explicit path)
            self.store.add_factors(self.name, *factors, scale=attn.scale, value_keys=img_len, half_ok=False)
        if cols is None and fused_self:
            return
        probs = image_query_probs(attn, hidden_states, encoder_hidden_states,
                                  max_chunk_elements=self.max_chunk_elements, factors=factors)
        if cols is not None:
            index = self._column_index(cols, img_len, probs.device)
            self.store.add("cross", self.name, probs.index_select(2, index).unsqueeze(1))
        if self.want_self and not fused_self:
            self.store.add("self", self.name, probs[:, :, :img_len].unsqueeze(1))


class MMDiTAttentionExtractor:
    """Capture joint (and SD3.5 image-only) attention of a backbone with ``attention_kind == "mmdit"``.

    The backbone's :meth:`attention_layers` says which modules exist: kind ``"joint"`` layers
    provide cross and self maps, kind ``"self"`` layers only self maps.
    """

    def __init__(self, backbone: Backbone, *, max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        self.backbone = backbone
        self.max_chunk_elements = int(max_chunk_elements)

    def _select(
        self, requested: Sequence[str] | None, allowed: list[str], kind: str, other: dict[str, str]
    ) -> list[str]:
        if requested is None:
            return list(allowed)
        if isinstance(requested, str):
            requested = [requested]
        bad = [n for n in requested if n not in allowed]
        if bad:
            why = "; ".join(f"{n} is a '{other[n]}' layer" for n in bad if n in other)
            raise InputError(
                f"cannot capture {kind} attention of layer(s) {bad}" + (f" ({why})" if why else " (unknown names)"),
                where=f"backbone {getattr(self.backbone, 'name', '?')}",
                fix=f"choose among the {kind}-capable layers: {allowed}",
            )
        return list(dict.fromkeys(requested))

    @contextmanager
    def capture(
        self,
        *,
        cross_layers: Sequence[str] | None = None,
        self_layers: Sequence[str] | None = None,
        token_indices: Sequence[int] | None = None,
        keep_steps: bool = False,
    ) -> Iterator[AttentionStore]:
        """Install capturing processors on the requested layers; yield the store; restore on exit.

        ``cross_layers``: joint layers whose image->text block is kept (``None`` = all joint
        layers, ``[]`` = none). ``self_layers``: joint or image-only layers whose image->image
        block is kept (``None`` = all). ``token_indices``: text-axis columns kept in cross maps
        (``None`` = all ``max_tokens``).
        """
        layers = self.backbone.attention_layers()
        kinds = {layer.name: layer.kind for layer in layers}
        joint = [n for n, k in kinds.items() if k == "joint"]
        selfish = [n for n, k in kinds.items() if k in ("joint", "self")]
        cross = self._select(cross_layers, joint, "cross", kinds)
        selfs = self._select(self_layers, selfish, "self", kinds)
        if token_indices is not None:
            token_indices = [int(i) for i in token_indices]
            limit = int(getattr(self.backbone, "max_tokens", 0) or 0)
            out = [i for i in token_indices if i < 0 or (limit and i >= limit)]
            if out:
                raise InputError(
                    f"token indices {out} are outside the text axis [0, {limit})",
                    where="capture(token_indices=...)",
                    fix="use positions from backbone.token_spans(prompt, phrase)",
                )
        names = [n for n in kinds if n in set(cross) | set(selfs)]  # forward order
        if not names:
            raise PluginError(
                f"no attention layer hooked (cross_layers={cross_layers!r}, self_layers={self_layers!r}, "
                f"backbone {getattr(self.backbone, 'name', '?')} has {len(layers)} attention layers)",
                where="mmdit_attention",
                fix="request at least one layer, e.g. leave cross_layers=None to capture all joint layers",
            )
        store = AttentionStore(keep_steps=keep_steps)
        store.hooked = {"cross": len(cross), "self": len(selfs)}
        denoiser = self.backbone.denoiser
        originals: list[tuple[Any, Any]] = []
        try:
            for name in names:
                try:
                    module = denoiser.get_submodule(name)
                except AttributeError as exc:
                    raise PluginError(
                        f"attention layer {name} reported by the backbone does not exist in its denoiser",
                        where=f"backbone {getattr(self.backbone, 'name', '?')}",
                        fix="the backbone plugin's attention_layers() is out of sync with the model",
                    ) from exc
                if not hasattr(module, "set_processor") or getattr(module, "processor", None) is None:
                    raise PluginError(f"module {name} is not a diffusers Attention module with a processor",
                                      where="mmdit_attention",
                                      fix="the backbone plugin's attention_layers() must name Attention modules")
                original = module.processor
                module.set_processor(JointCaptureProcessor(
                    original, name, store,
                    want_cross=name in cross, want_self=name in selfs,
                    token_indices=token_indices, max_chunk_elements=self.max_chunk_elements,
                ))
                originals.append((module, original))
            yield store
        finally:
            for module, original in reversed(originals):
                module.set_processor(original)


# ----------------------------------------------------------------------------------- hooks
@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(
        provides={"extractors": {PLUGIN_NAME: {"max_chunk_elements": DEFAULT_CHUNK_ELEMENTS}}},
        description="MM-DiT (SD3/SD3.5) joint-attention capture, split into cross and self maps",
    )


@hookimpl
def t2ialign_make_attention_extractor(backbone: Backbone, spec: EntrySpec) -> MMDiTAttentionExtractor | None:
    if getattr(backbone, "attention_kind", None) != "mmdit" or spec.plugin not in ("auto", PLUGIN_NAME):
        return None
    chunk = spec.get("max_chunk_elements", DEFAULT_CHUNK_ELEMENTS)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise PluginError(f"max_chunk_elements must be a positive integer, got {chunk!r}", where=spec.where,
                          fix="use e.g. max_chunk_elements: 134217728")
    return MMDiTAttentionExtractor(backbone, max_chunk_elements=chunk)
