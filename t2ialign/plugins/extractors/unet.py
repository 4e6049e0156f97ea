"""Attention capture for UNet denoisers (SD 1.x/2.x, SDXL and any ``attention_kind == "unet"`` backbone).

diffusers' default processors call fused ``scaled_dot_product_attention`` and never materialise
attention probabilities. For the layers a caller asks for, this extractor swaps in a thin
processor (through ``Attention.set_processor``, diffusers' public API) that

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

The same plugin answers ``t2ialign_make_attention_editor`` for UNets: Prompt-to-Prompt attention
control lives beside this capture code, in :mod:`t2ialign.plugins.extractors.unet_editing`.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from t2ialign.core.attention_store import AttentionStore
from t2ialign.core.errors import PluginError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.specs import EntrySpec, PluginInfo

if TYPE_CHECKING:
    from t2ialign.core.protocols import Backbone

PLUGIN = "unet_attention"
#: extractor options: ``chunk_mb`` bounds the float32 logits block computed at once
#: (null = 8 MB on a CPU, 256 MB on a GPU: see :func:`block_bytes_for`)
OPTIONS: dict[str, Any] = {"chunk_mb": None}


def attention_inputs(
    attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, temb: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...] | None]:
    """Query tokens, key/value context and the 4-D input shape (or None) of one ``Attention`` call.

    The input transformations a standard diffusers processor applies before the projections:
    spatial norm, 4-D feature map -> tokens, group norm, cross-attention norm.
    """
    x = hidden_states
    if getattr(attn, "spatial_norm", None) is not None:
        x = attn.spatial_norm(x, temb)
    shape4d = tuple(x.shape) if x.ndim == 4 else None
    if shape4d is not None:
        b, c, h, w = shape4d
        x = x.view(b, c, h * w).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    context = x if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and getattr(attn, "norm_cross", None):
        context = attn.norm_encoder_hidden_states(context)
    return x, context, shape4d


def attention_probs(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    temb: torch.Tensor | None = None,
    *,
    columns: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Head-averaged ``softmax(Q K^T * attn.scale)`` of one diffusers ``Attention`` call, ``(B, Q, K)``.

    Applies the input transformations a standard processor applies before the projections
    (spatial norm, 4-D -> tokens, group norm, cross-norm) and the projections themselves; see
    :func:`probs_from_projections` for the rest.
    """
    x, context, _ = attention_inputs(attn, hidden_states, encoder_hidden_states, temb)
    return probs_from_projections(attn, attn.to_q(x), attn.to_k(context), columns=columns, chunk_bytes=chunk_bytes)


def logits_dtype_for(attn: Any, query: torch.Tensor) -> torch.dtype:
    """The dtype of the explicit ``q @ k^T`` (the softmax itself always runs in float32).

    float16 projections on an accelerator multiply in float16 on tensor cores, as the model's own
    attention (and the reference code) does: an H200 spent ~8% of an SD1.5 pipeline run in a
    float32 FFMA GEMM for these logits (benchmarks/gpu.py, profile). Everything else multiplies in
    float32: CPUs, bfloat16 (8-bit mantissa: logits of ~10 would be off by ~0.04), and layers that
    ask for ``upcast_attention`` (SD2.1 sets it because its float16 logits overflow).
    """
    if query.dtype == torch.float16 and query.device.type != "cpu" and not getattr(attn, "upcast_attention", False):
        return torch.float16
    return torch.float32


def head_factors(attn: Any, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``attn.to_q`` / ``attn.to_k`` outputs ``(B, N, heads * d)`` -> per-head ``(B, heads, N, d)``
    after the layer's q/k norms: the operands of its ``softmax(q k^T * attn.scale)``."""
    batch, heads = query.shape[0], attn.heads
    head_dim = key.shape[-1] // heads
    query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    return query, key


def probs_from_projections(
    attn: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    columns: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
    logits_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Head-averaged attention probabilities from the outputs of ``attn.to_q`` / ``attn.to_k``.

    Splits heads, applies the per-head q/k norms, and computes the softmax in float32 (the logits
    in ``logits_dtype``; ``None`` = :func:`logits_dtype_for`). ``columns`` keeps only those key
    positions (after the softmax over all keys). Query rows are processed in blocks (all heads
    together) so that at most ``chunk_bytes`` of float32 probabilities exist at once (at least one
    row); ``None`` picks the device's default (:func:`block_bytes_for`).
    """
    batch = query.shape[0]
    heads = attn.heads
    query, key = head_factors(attn, query, key)
    work = logits_dtype or logits_dtype_for(attn, query)
    # float32 softmax: the reference runs it in fp16; fp32 is the more faithful estimate
    # contiguous (B, H, N, D): the head split above is a strided view of (B, N, H*D), and batched
    # matmuls over that layout were ~1.5x slower per block on a CPU
    query = (query.to(work) * attn.scale).contiguous()
    key_t = key.to(work).contiguous().transpose(-1, -2)
    n_q, n_k = query.shape[2], key_t.shape[-1]
    if chunk_bytes is None:
        chunk_bytes = block_bytes_for(query.device)
    # Blocks of query rows with all heads at once: each block's logits are softmaxed, head-averaged
    # and written out while still in cache. On a CPU, 8 MB blocks made 64x64 self-attention maps
    # ~4x faster than one whole head at a time (benchmarks/speed.py, capture overhead).
    per_row = batch * heads * n_k * 4
    rows = max(1, min(n_q, chunk_bytes // max(per_row, 1)))
    n_cols = n_k if columns is None else int(columns.numel())
    cols = None if columns is None else columns.to(query.device)
    total = torch.empty(batch, n_q, n_cols, dtype=torch.float32, device=query.device)
    for start in range(0, n_q, rows):
        probs = torch.softmax(query[:, :, start : start + rows] @ key_t, dim=-1, dtype=torch.float32)
        if cols is not None:
            probs = probs.index_select(-1, cols)
        total[:, start : start + rows] = probs.mean(dim=1)
    return total


def block_bytes_for(device: torch.device) -> int:
    """Default logits block: cache-sized on CPUs, large on GPUs (fewer kernel launches)."""
    return (8 if device.type == "cpu" else 256) * 2**20


class DelegatingProcessor:
    """Base of processors that wrap a layer's original processor and hand it calls unchanged.

    ``Attention.forward`` filters keyword arguments by the signature of the processor it holds;
    :meth:`delegate` applies the same filter for the wrapped processor, so it gets exactly what
    it would have got without the wrapper.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        params = inspect.signature(inner.__call__).parameters
        self._inner_takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._inner_params = set(params)

    def delegate(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                 attention_mask: torch.Tensor | None, temb: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
        if temb is not None:
            kwargs["temb"] = temb
        if not self._inner_takes_any:
            kwargs = {k: v for k, v in kwargs.items() if k in self._inner_params}
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, **kwargs)


class ProjectionRecorder(DelegatingProcessor):
    """Delegates to the layer's original processor and keeps the q/k projections it computed.

    Forward hooks on ``attn.to_q`` / ``attn.to_k`` observe the projections the original
    processor computes anyway, so an explicit softmax needs no second set of input norms and
    projections. Only the first call of each projection inside our own delegation is kept: a
    processor may reuse a projection for extra tokens (adapters), which are not part of this
    layer's map. ``keep_graph`` keeps the projections' autograd graph (training) instead of
    detaching them (capture).
    """

    keep_graph = False

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self._seen: dict[str, torch.Tensor] = {}
        self._listening = False

    def observe(self, attn: Any) -> list[Any]:
        """Hook the layer's q/k projections; returns the hook handles (the caller removes them)."""
        handles = []
        for role in ("q", "k"):
            proj = getattr(attn, f"to_{role}", None)
            if isinstance(proj, torch.nn.Module):
                handles.append(proj.register_forward_hook(self._recorder(role)))
        return handles

    def _recorder(self, role: str):
        def record(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
            if self._listening and role not in self._seen:
                self._seen[role] = output if self.keep_graph else output.detach()
        return record

    def delegate_and_record(self, attn: Any, hidden_states: torch.Tensor,
                            encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None,
                            temb: torch.Tensor | None, kwargs: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
        """The original processor's output, and the projections it computed (``{"q": ..., "k": ...}``,
        a role missing when the processor did not call that projection)."""
        self._seen = {}
        self._listening = True
        try:
            out = self.delegate(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        finally:
            self._listening = False
        seen, self._seen = self._seen, {}
        return out, seen


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


@contextmanager
def recorders_installed(layers: dict[str, Any], make: Callable[[str, Any], ProjectionRecorder]) -> Iterator[None]:
    """Within the block, ``layers[name]`` runs ``make(name, original_processor)`` (a
    :class:`ProjectionRecorder`) with its q/k hooks; hooks are removed and the original
    processors restored on exit, also on exceptions."""
    originals: dict[str, Any] = {}
    handles: list[Any] = []
    try:
        for name, module in layers.items():
            originals[name] = module.get_processor() if hasattr(module, "get_processor") else module.processor
            recorder = make(name, originals[name])
            handles += recorder.observe(module)
            module.set_processor(recorder)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, processor in originals.items():
            layers[name].set_processor(processor)


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
    it builds on this module's processors, and capture alone never needs it)."""
    if getattr(backbone, "attention_kind", None) != "unet":
        return None
    from t2ialign.plugins.extractors.unet_editing import AttentionEditController

    return AttentionEditController
