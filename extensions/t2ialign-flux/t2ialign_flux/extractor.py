"""Attention capture for FLUX.1 (``flux_attention``): the joint maps of double- and single-stream blocks.

Both block types attend once over the concatenation ``[text tokens; image tokens]`` (text FIRST,
unlike SD3), after RMS q/k norms and a rotary position embedding over the whole sequence:

- a double-stream block (``transformer_blocks.i.attn``) projects the two streams separately
  (``to_q``/``to_k`` for the image, ``add_q_proj``/``add_k_proj`` + ``norm_added_k`` for the text);
- a single-stream block (``single_transformer_blocks.i.attn``) receives the already concatenated
  sequence and projects it with one ``to_q``/``to_k``; where the text ends is read by a forward
  pre-hook on the block (its ``encoder_hidden_states`` argument).

For the **image query rows** of the joint softmax ``P = softmax(q k^T / sqrt(d))`` the capturing
processor stores, head-averaged and not renormalised (as for SD3 in the reference):

- kind ``"cross"``: ``P[:, img, token_indices]`` (image -> T5 tokens; the text axis starts at 0),
- kind ``"self"``:  ``P[:, img, txt_len:]`` (image -> image),

then calls the layer's ORIGINAL processor, so the model output is exactly what it is without
capture. diffusers' Flux processors use fused attention kernels, so probabilities never exist: the
image-query rows are recomputed here from the module's own projections, in blocks of rows with all
heads at once (at most ``chunk_mb`` of float32 logits per block).

This module relies only on t2ialign's public contract (the ``AttentionExtractor`` protocol and
:class:`~t2ialign.core.attention_store.AttentionStore`), not on the built-in extractors' internals.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from t2ialign.core.attention_store import AttentionStore
from t2ialign.core.errors import InputError, PluginError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign_flux.flux import ATTENTION_KIND

PLUGIN_NAME = "flux_attention"
#: ``chunk_mb``: float32 logits per block of query rows (null: 8 MB on a CPU, 256 MB on a GPU)
OPTIONS: dict[str, Any] = {"chunk_mb": None}


def _block_bytes(device: torch.device, chunk_mb: float | None) -> int:
    if chunk_mb is not None:
        return max(1, int(float(chunk_mb) * 2**20))
    # cache-sized blocks on a CPU, few large kernels on a GPU
    return (8 if device.type == "cpu" else 256) * 2**20


def _qk(attn: Any, x: torch.Tensor, *, added: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k projections of ``x`` by the image (``added=False``) or text (``added=True``) weights,
    as ``(B, heads, N, head_dim)`` float32 after the per-head RMS norms."""
    if getattr(attn, "fused_projections", False):
        fused = attn.to_added_qkv if added else attn.to_qkv
        q, k, _ = fused(x).chunk(3, dim=-1)
    elif added:
        q, k = attn.add_q_proj(x), attn.add_k_proj(x)
    else:
        q, k = attn.to_q(x), attn.to_k(x)
    norm_q, norm_k = (attn.norm_added_q, attn.norm_added_k) if added else (attn.norm_q, attn.norm_k)
    q = norm_q(q.unflatten(-1, (-1, attn.head_dim))).transpose(1, 2)
    k = norm_k(k.unflatten(-1, (-1, attn.head_dim))).transpose(1, 2)
    # softmax over thousands of keys in reduced precision loses the small probabilities maps are made of
    return q.float(), k.float()


def _rotate(x: torch.Tensor, rotary: Any, start: int) -> torch.Tensor:
    """Rotary embedding of the positions ``start .. start + N`` of the joint sequence (diffusers' own function)."""
    if rotary is None:
        return x
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = rotary
    n = x.shape[2]
    return apply_rotary_emb(x, (cos[start:start + n].float(), sin[start:start + n].float()), sequence_dim=2)


def image_query_maps(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    rotary: Any,
    *,
    txt_len: int,
    columns: torch.Tensor | slice | None,
    want_self: bool,
    chunk_bytes: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Head-averaged joint-softmax rows of the image queries of one Flux attention call.

    Double-stream call: ``hidden_states`` are the image tokens, ``encoder_hidden_states`` the text.
    Single-stream call: ``hidden_states`` is ``[text; image]`` and ``encoder_hidden_states`` is None;
    ``txt_len`` says where the image starts. Returns ``(cross, self)``: ``(B, img, len(columns))``
    probabilities of the text columns ``columns`` (positions, or ``slice(None)`` for the whole text;
    None when ``columns`` is None) and
    ``(B, img, img)`` image->image probabilities (None unless ``want_self``).
    """
    with torch.no_grad():
        if encoder_hidden_states is not None:  # double stream
            q, k_img = _qk(attn, hidden_states, added=False)
            _, k_txt = _qk(attn, encoder_hidden_states, added=True)
            k = torch.cat([k_txt, k_img], dim=2)
        else:  # single stream: project the image rows' queries only
            q, _ = _qk(attn, hidden_states[:, txt_len:], added=False)
            _, k = _qk(attn, hidden_states, added=False)
        txt_len = k.shape[2] - q.shape[2]
        q = _rotate(q, rotary, txt_len) * attn.head_dim ** -0.5
        k_t = _rotate(k, rotary, 0).transpose(-1, -2).contiguous()
        batch, heads, n_img, _ = q.shape
        n_keys = k_t.shape[-1]
        rows = max(1, min(n_img, chunk_bytes // max(batch * heads * n_keys * 4, 1)))
        if isinstance(columns, slice):
            columns = torch.arange(txt_len, device=q.device)[columns]
        cross = None if columns is None else q.new_empty(batch, n_img, int(columns.numel()))
        selfm = q.new_empty(batch, n_img, n_img) if want_self else None
        for start in range(0, n_img, rows):
            probs = torch.softmax(q[:, :, start:start + rows] @ k_t, dim=-1)
            if cross is not None:
                cross[:, start:start + rows] = probs.index_select(-1, columns).mean(dim=1)
            if selfm is not None:
                selfm[:, start:start + rows] = probs[..., txt_len:].mean(dim=1)
        return cross, selfm


class FluxCaptureProcessor:
    """Records one Flux attention layer's image-query maps, then runs the layer's original processor.

    Its ``__call__`` names exactly the arguments of diffusers' ``FluxAttnProcessor``:
    ``FluxAttention.forward`` filters keyword arguments by the processor's signature, so a plain
    FLUX forward sees the same arguments with or without capture.
    """

    def __init__(self, original: Any, name: str, store: AttentionStore, *, single: bool,
                 columns: torch.Tensor | slice | None, want_self: bool, chunk_mb: float | None):
        self.original = original
        self.name = name
        self.store = store
        self.single = single
        self.columns = columns
        # checked against each call's text length without reading the device tensor (a sync)
        self.max_column = int(columns.max()) if isinstance(columns, torch.Tensor) else None
        self.want_self = want_self
        self.chunk_mb = chunk_mb
        #: text length of the current single-stream call, set by the block's pre-hook
        self.text_len: int | None = None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        self._record(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def _record(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                rotary: Any) -> None:
        if self.single:
            if self.text_len is None:
                raise PluginError(f"layer {self.name} was called without its block, so where the text ends is unknown",
                                  where=PLUGIN_NAME, fix="run the whole transformer (backbone.predict)")
            txt_len = self.text_len
        else:
            if encoder_hidden_states is None:
                raise PluginError(f"double-stream layer {self.name} got no text tokens", where=PLUGIN_NAME,
                                  fix="the backbone's attention_layers() is out of sync with the model")
            txt_len = encoder_hidden_states.shape[1]
        if self.max_column is not None and self.max_column >= txt_len:
            raise InputError(f"token index {self.max_column} is outside the {txt_len} text tokens of "
                             f"layer {self.name}", where="capture(token_indices=...)",
                             fix="use positions from backbone.token_spans(prompt, phrase)")
        cross, selfm = image_query_maps(
            attn, hidden_states, encoder_hidden_states, rotary, txt_len=txt_len, columns=self.columns,
            want_self=self.want_self, chunk_bytes=_block_bytes(hidden_states.device, self.chunk_mb))
        # the store averages over dim 1 (heads); these maps are head-averaged already
        if cross is not None:
            self.store.add("cross", self.name, cross.unsqueeze(1))
        if selfm is not None:
            self.store.add("self", self.name, selfm.unsqueeze(1))


class FluxAttentionExtractor:
    """Capture the joint attention of a backbone with ``attention_kind == "flux"``."""

    def __init__(self, backbone: Any, *, chunk_mb: float | None = None):
        self.backbone = backbone
        self.chunk_mb = chunk_mb

    def _select(self, requested: Sequence[str] | None, allowed: list[str], kind: str) -> list[str]:
        if requested is None:
            return list(allowed)
        requested = [requested] if isinstance(requested, str) else list(requested)
        unknown = [n for n in requested if n not in allowed]
        if unknown:
            raise InputError(f"cannot capture {kind} attention of unknown layer(s) {unknown[:5]}",
                             where=f"backbone {getattr(self.backbone, 'name', '?')}",
                             fix=f"use names from backbone.attention_layers(), e.g. {allowed[:2]} "
                             f"({len(allowed)} in all)")
        return list(dict.fromkeys(requested))

    @contextmanager
    def capture(self, *, cross_layers: Sequence[str] | None = None, self_layers: Sequence[str] | None = None,
                token_indices: Sequence[int] | None = None, keep_steps: bool = False) -> Iterator[AttentionStore]:
        """Install capturing processors on the requested layers; yield the store; restore on exit.

        ``None`` = every layer (all FLUX layers are joint, so all give both kinds), ``[]`` = none
        of that kind. ``token_indices``: T5 positions kept in cross maps (``None`` = all).
        """
        layers = [l.name for l in self.backbone.attention_layers()]
        cross = self._select(cross_layers, layers, "cross")
        selfs = self._select(self_layers, layers, "self")
        names = [n for n in layers if n in set(cross) | set(selfs)]  # forward order
        if not names:
            raise PluginError(
                f"no attention layer hooked (cross_layers={cross_layers!r}, self_layers={self_layers!r}; backbone "
                f"{getattr(self.backbone, 'name', '?')} has {len(layers)} attention layers)",
                where=PLUGIN_NAME, fix="request at least one layer, e.g. leave cross_layers=None for all")
        device = getattr(self.backbone, "device", None) or torch.device("cpu")
        if token_indices is not None:
            token_indices = [int(i) for i in token_indices]
            limit = int(getattr(self.backbone, "max_tokens", 0) or 0)
            bad = [i for i in token_indices if i < 0 or (limit and i >= limit)]
            if bad or not token_indices:
                raise InputError(f"token indices {bad or token_indices} are empty or outside the text axis [0, {limit})",
                                 where="capture(token_indices=...)",
                                 fix="use positions from backbone.token_spans(prompt, phrase)")
        store = AttentionStore(keep_steps=keep_steps)
        store.hooked = {"cross": len(cross), "self": len(selfs)}
        denoiser = self.backbone.denoiser
        installed: list[tuple[Any, Any]] = []
        handles: list[Any] = []
        try:
            for name in names:
                module = self._attention_module(denoiser, name)
                columns: torch.Tensor | slice | None = None
                if name in cross:
                    # the positions are put on the device once per capture: a host->device copy in
                    # every layer call would synchronise the stream each time
                    columns = (slice(None) if token_indices is None
                               else torch.tensor(token_indices, dtype=torch.long, device=device))
                single = name.startswith("single_transformer_blocks.")
                processor = FluxCaptureProcessor(module.processor, name, store, single=single, columns=columns,
                                                 want_self=name in selfs, chunk_mb=self.chunk_mb)
                if single:
                    block = denoiser.get_submodule(name.rsplit(".", 1)[0])
                    handles.append(block.register_forward_pre_hook(_text_length_hook(processor), with_kwargs=True))
                installed.append((module, module.processor))
                module.set_processor(processor)
            yield store
        finally:
            for handle in handles:
                handle.remove()
            for module, original in reversed(installed):
                module.set_processor(original)

    def _attention_module(self, denoiser: torch.nn.Module, name: str) -> Any:
        try:
            module = denoiser.get_submodule(name)
        except AttributeError as exc:
            raise PluginError(f"attention layer {name} reported by the backbone does not exist in its denoiser",
                              where=f"backbone {getattr(self.backbone, 'name', '?')}",
                              fix="the backbone plugin's attention_layers() is out of sync with the model") from exc
        if not hasattr(module, "set_processor") or getattr(module, "processor", None) is None:
            raise PluginError(f"module {name} is not a diffusers attention module with a processor", where=PLUGIN_NAME,
                              fix="the backbone plugin's attention_layers() must name FluxAttention modules")
        return module


def _text_length_hook(processor: FluxCaptureProcessor):
    """Pre-hook of a single-stream block: its ``encoder_hidden_states`` argument is the text part."""
    def hook(_block: Any, args: tuple, kwargs: dict) -> None:
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        processor.text_len = None if text is None else int(text.shape[1])
    return hook


# ----------------------------------------------------------------------------------- hooks
@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"extractors": {PLUGIN_NAME: dict(OPTIONS)}},
                      description="FLUX.1 joint-attention capture (double- and single-stream blocks), "
                                  "split into image->text and image->image maps")


@hookimpl
def t2ialign_make_attention_extractor(backbone: Any, spec: EntrySpec) -> FluxAttentionExtractor | None:
    if getattr(backbone, "attention_kind", None) != ATTENTION_KIND or spec.plugin not in ("auto", PLUGIN_NAME):
        return None
    chunk_mb = spec.get("chunk_mb", None)
    if chunk_mb is not None and (isinstance(chunk_mb, bool) or not isinstance(chunk_mb, (int, float)) or chunk_mb <= 0):
        raise PluginError(f"extractor option chunk_mb must be a positive number of megabytes or null, got {chunk_mb!r}",
                          where=spec.where, fix="e.g. chunk_mb: 64, or leave it out (auto)")
    return FluxAttentionExtractor(backbone, chunk_mb=chunk_mb)
