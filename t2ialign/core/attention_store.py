"""Running means of captured attention probabilities, filled by extractor processors.

Processors call :meth:`AttentionStore.add` with the probabilities of one layer for one forward
call, shaped ``(B, heads, Q, K)``. The store averages over heads at once (maps are never kept
per head), keeps a running sum per layer and batch row, and divides by the number of calls on
read. Nothing per step is kept unless ``keep_steps=True``.

Self-attention can be kept in one of two forms (``AttentionStore.self_maps``):

- ``"explicit"``: the running mean ``(Q, Q)`` map, as above;
- ``"fused"``: the per-head query/key factors of every call (:class:`SelfAttentionFactors`),
  so that a map is never formed: propagation later applies ``mean_{rows,heads} softmax(q k^T s) @ V``
  through ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels,
  which never hold the ``Q x Q`` logits). What is kept grows with the number of rows (collect
  timesteps): ``rows x heads x (Q + K) x head_dim`` elements per layer, in ``factor_dtype`` on
  ``factor_device`` (docs/backbones.md, "What the fused path stores").
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SELF_MAP_MODES = ("fused", "explicit")
#: bound on the float32 output/value blocks one fused SDPA call works on (CPU / accelerator)
_APPLY_BLOCK_BYTES = {"cpu": 64 * 2**20, "other": 512 * 2**20}


def _is_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


class SelfAttentionFactors:
    """The query/key factors of one layer's self-attention over all recorded rows.

    Each :meth:`add` keeps ``query (B, heads, Q, d)`` and ``key (B, heads, K, d)`` (after the
    layer's q/k norms), ``K >= Q``: keys past the first ``value_keys`` (MM-DiT's text keys) take
    part in the softmax but carry zero value, which is what the un-renormalised image->image block
    of a joint softmax is. :meth:`apply` gives ``mean_{rows, heads} softmax(q k^T * scale) @ [V; 0]``
    for values ``V (value_keys, C)``: exactly the head/row-averaged map times ``V``, without the map.

    ``half_ok``: the layer allows float16 logits (no ``upcast_attention``); float16 factors on an
    accelerator then run SDPA in float16 (tensor cores), everything else in float32 -- the same
    rule as the explicit path's logits (``unet.logits_dtype_for``).
    """

    def __init__(self, name: str, *, scale: float, value_keys: int, half_ok: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        self.name = name
        self.scale = float(scale)
        self.value_keys = int(value_keys)
        self.half_ok = bool(half_ok)
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ------------------------------------------------------------------ recording
    def add(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """Keep one call's factors (``(B, heads, Q, d)`` and ``(B, heads, K, d)``)."""
        if query.ndim != 4 or key.ndim != 4 or query.shape[:2] != key.shape[:2] or query.shape[-1] != key.shape[-1]:
            raise ValueError(f"layer {self.name}: query {tuple(query.shape)} and key {tuple(key.shape)} are not "
                             "(B, heads, Q, d) / (B, heads, K, d)")
        if key.shape[2] < self.value_keys:
            raise ValueError(f"layer {self.name}: {key.shape[2]} keys, fewer than its {self.value_keys} value keys")
        if self.chunks and (self.chunks[0][0].shape[1:] != query.shape[1:]
                            or self.chunks[0][1].shape[1:] != key.shape[1:]):
            raise ValueError(f"layer {self.name}: factor shapes changed between calls "
                             f"({tuple(self.chunks[0][0].shape[1:])} -> {tuple(query.shape[1:])}); "
                             "use one store per image size")
        # no copy when dtype and device already match: the projections are not modified afterwards
        self.chunks.append((self._keep(query), self._keep(key)))

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if self.dtype is not None or self.device is not None:
            t = t.to(device=self.device or t.device, dtype=self.dtype or t.dtype)
        return t

    @property
    def rows(self) -> int:
        return sum(int(q.shape[0]) for q, _ in self.chunks)

    @property
    def heads(self) -> int:
        return int(self.chunks[0][0].shape[1]) if self.chunks else 0

    @property
    def queries(self) -> int:
        return int(self.chunks[0][0].shape[2]) if self.chunks else 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept factors."""
        return sum(q.numel() * q.element_size() + k.numel() * k.element_size() for q, k in self.chunks)

    # ------------------------------------------------------------------ use
    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """``(value_keys, C)`` values -> ``(Q, C)`` float32: the mean self map times ``values``."""
        if not self.chunks:
            raise ValueError(f"layer {self.name}: no self-attention factors were recorded")
        if values.ndim != 2 or values.shape[0] != self.value_keys:
            raise ValueError(f"layer {self.name}: values {tuple(values.shape)} do not match its "
                             f"{self.value_keys} value keys")
        device = values.device
        d = int(self.chunks[0][0].shape[-1])
        work = self._work_dtype(device)
        n_keys = int(self.chunks[0][1].shape[2])
        c = int(values.shape[1])
        # fused CPU / flash kernels need the value width to equal the q/k head dim: the C columns
        # are padded to a multiple of it and run d at a time
        width = d * max(1, math.ceil(c / d))
        padded = torch.zeros(n_keys, width, dtype=work, device=device)
        padded[: self.value_keys, :c] = values.to(work)
        heads, n_q = self.heads, self.queries
        per_row = heads * max(n_q, n_keys) * d * 4
        budget = _APPLY_BLOCK_BYTES["cpu" if device.type == "cpu" else "other"]
        step = max(1, budget // max(per_row, 1))
        total = torch.zeros(n_q, width, dtype=torch.float32, device=device)
        for query, key in self.chunks:
            for start in range(0, query.shape[0], step):
                q = query[start : start + step].to(device=device, dtype=work)
                k = key[start : start + step].to(device=device, dtype=work)
                for col in range(0, width, d):
                    v = padded[None, None, :, col : col + d].expand(q.shape[0], heads, n_keys, d)
                    out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
                    total[:, col : col + d] += out.sum(dim=(0, 1), dtype=torch.float32)
        return total[:, :c] / (self.rows * heads)

    def _work_dtype(self, device: torch.device) -> torch.dtype:
        stored = self.chunks[0][0].dtype
        if stored == torch.float16 and device.type != "cpu" and self.half_ok:
            return torch.float16
        return torch.float32


@dataclass
class AttentionStore:
    """Head-averaged, call-averaged attention maps per layer.

    ``cross[name]``: ``(B, Q, K_selected)`` mean image->text probabilities.
    ``self_[name]``: ``(B, Q, Q)`` mean image->image probabilities.
    ``hooked``: number of hooked layers by kind, set by the extractor.
    ``steps``: per-call maps when ``keep_steps`` (list of ``(kind, name, tensor)``).
    ``dtype``: accumulation dtype (float32 keeps long running sums exact enough).
    ``reduce_batch``: also average over batch rows at once (rows are then weighted equally across
    calls of different batch sizes). Pipelines that batch several noised copies of ONE image set
    it, so a 4096x4096 self map is kept once, not once per row.
    ``self_maps``: ``"explicit"`` (maps in ``self_``) or ``"fused"`` (factors in ``self_factors``;
    needs ``reduce_batch``: the factors of all rows make one averaged operator). Set before the
    first forward, like ``reduce_batch``; extractors read it on every call.
    ``factor_dtype`` / ``factor_device``: how fused factors are kept (``None`` = as computed, e.g.
    ``torch.bfloat16`` halves them, ``"cpu"`` keeps them in host memory off an accelerator).
    """

    keep_steps: bool = False
    reduce_batch: bool = False
    dtype: torch.dtype = torch.float32
    hooked: dict[str, int] = field(default_factory=dict)
    _sums: dict[str, dict[str, torch.Tensor]] = field(default_factory=lambda: {"cross": {}, "self": {}})
    _calls: dict[str, dict[str, int]] = field(default_factory=lambda: {"cross": defaultdict(int), "self": defaultdict(int)})
    steps: list[tuple[str, str, torch.Tensor]] = field(default_factory=list)
    self_maps: str = "explicit"
    factor_dtype: torch.dtype | None = None
    factor_device: torch.device | str | None = None
    _factors: dict[str, SelfAttentionFactors] = field(default_factory=dict)

    @property
    def fused(self) -> bool:
        """Do extractors record self-attention as factors (``self_maps == "fused"``)?"""
        if self.self_maps not in SELF_MAP_MODES:
            raise ValueError(f"self_maps must be one of {SELF_MAP_MODES}, got {self.self_maps!r}")
        return self.self_maps == "fused"

    def add_factors(self, name: str, query: torch.Tensor, key: torch.Tensor, *, scale: float,
                    value_keys: int | None = None, half_ok: bool = True) -> None:
        """Keep one call's self-attention factors of layer ``name`` (see :class:`SelfAttentionFactors`).

        ``value_keys``: how many leading keys are the layer's image keys (``None`` = all).
        """
        if not self.reduce_batch:
            raise ValueError("fused self-attention factors average every batch row; set store.reduce_batch = True")
        factors = self._factors.get(name)
        if factors is None:
            factors = self._factors[name] = SelfAttentionFactors(
                name, scale=scale, value_keys=key.shape[2] if value_keys is None else value_keys,
                half_ok=half_ok, dtype=self.factor_dtype, device=self.factor_device)
        factors.add(query, key)
        self._calls["self"][name] += int(query.shape[0])

    @property
    def self_factors(self) -> dict[str, SelfAttentionFactors]:
        """Fused self-attention factors per layer name (filled when ``self_maps == "fused"``)."""
        return dict(self._factors)

    def factor_bytes(self) -> int:
        """Bytes held by all kept self-attention factors."""
        return sum(f.nbytes for f in self._factors.values())

    def add(self, kind: str, name: str, probs: torch.Tensor) -> None:
        """Add one call's probabilities ``(B, heads, Q, K)`` of layer ``name`` (kind cross/self)."""
        mean = probs.detach().to(self.dtype).mean(dim=1)
        rows = 1
        if self.reduce_batch:
            rows = int(mean.shape[0])
            mean = mean.sum(dim=0, keepdim=True)
        sums = self._sums[kind]
        if name in sums and sums[name].shape == mean.shape:
            sums[name] += mean
        elif name in sums:
            raise ValueError(
                f"layer {name}: map shape changed between calls ({tuple(sums[name].shape)} -> "
                f"{tuple(mean.shape)}); use one store per batch shape"
            )
        else:
            sums[name] = mean.clone()
        self._calls[kind][name] += rows
        if self.keep_steps:
            self.steps.append((kind, name, mean.cpu()))

    def _means(self, kind: str) -> dict[str, torch.Tensor]:
        return {n: s / self._calls[kind][n] for n, s in self._sums[kind].items()}

    @property
    def cross(self) -> dict[str, torch.Tensor]:
        """Mean cross maps ``(B, Q, K)`` per layer name."""
        return self._means("cross")

    @property
    def self_(self) -> dict[str, torch.Tensor]:
        """Mean self maps ``(B, Q, Q)`` per layer name."""
        return self._means("self")

    def calls(self, kind: str, name: str) -> int:
        """Number of forward calls (or of batch rows with ``reduce_batch``) averaged for a layer."""
        return self._calls[kind][name]

    def reset(self) -> None:
        for kind in ("cross", "self"):
            self._sums[kind].clear()
            self._calls[kind].clear()
        self.steps.clear()
        self._factors.clear()
