"""Attention-processor building blocks: what every extractor, the editing controller and the toy
grounding loss that work through diffusers ``Attention`` processors share.

- :func:`attention_inputs`: the input transformations a standard processor applies before its
  projections (spatial norm, 4-D feature map -> tokens, group norm, cross-attention norm);
- :func:`attention_probs` / :func:`probs_from_projections` (with :func:`head_factors`): explicit
  head-averaged ``softmax(Q K^T * scale)`` from a layer's own projections, with the logits dtype
  and block-size rules :func:`logits_dtype_for` and :func:`block_bytes_for`;
- :class:`DelegatingProcessor` / :class:`ProjectionRecorder`, installed with
  :func:`recorders_installed`: processors that wrap a layer's original processor, hand it every
  call unchanged and (the recorder) keep the q/k projections it computed.

Why it is in core: several plugin packages build on these pieces (the ``unet_attention`` extractor
and its Prompt-to-Prompt controller in ``extractors``, the grounding loss in ``toy``), and plugin
packages do not import one another. Everything is duck-typed on the attributes of a diffusers
``Attention`` module (``to_q``, ``to_k``, ``heads``, ``scale``, optional norms, ``get_processor`` /
``set_processor``), so this module imports no diffusers.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch


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
