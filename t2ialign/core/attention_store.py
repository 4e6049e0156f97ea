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
#: value entries below this fraction of their column's largest are zeroed before a fused product
#: (they would only make float32 subnormals, see ``SelfAttentionFactors.apply``)
_FLUSH_BELOW = 2.0**-64


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
    rule as the explicit path's logits (``attention_processors.logits_dtype_for``).
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
        # rows folded into an explicit map by :meth:`fold`: sum over those rows and heads of the
        # image-key probabilities, (Q, value_keys) float32 -- what the explicit path keeps
        self.folded: torch.Tensor | None = None
        self.folded_rows = 0
        self._shape: tuple[int, int, int] | None = None  # heads, queries, keys of the first call
        self._head_dim = 0
        self.max_call_rows = 0  # the largest batch of one call (sizes the explicit path's transient)

    # ------------------------------------------------------------------ recording
    def add(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """Keep one call's factors (``(B, heads, Q, d)`` and ``(B, heads, K, d)``)."""
        if query.ndim != 4 or key.ndim != 4 or query.shape[:2] != key.shape[:2] or query.shape[-1] != key.shape[-1]:
            raise ValueError(f"layer {self.name}: query {tuple(query.shape)} and key {tuple(key.shape)} are not "
                             "(B, heads, Q, d) / (B, heads, K, d)")
        if key.shape[2] < self.value_keys:
            raise ValueError(f"layer {self.name}: {key.shape[2]} keys, fewer than its {self.value_keys} value keys")
        shape = (int(query.shape[1]), int(query.shape[2]), int(key.shape[2]))
        if self._shape is not None and (shape != self._shape or query.shape[-1] != self._head_dim):
            raise ValueError(f"layer {self.name}: factor shapes changed between calls "
                             f"(heads, queries, keys {self._shape} -> {shape}); use one store per image size")
        self._shape, self._head_dim = shape, int(query.shape[-1])
        self.max_call_rows = max(self.max_call_rows, int(query.shape[0]))
        # no copy when dtype and device already match: the projections are not modified afterwards
        self.chunks.append((self._keep(query), self._keep(key)))

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if self.dtype is not None or self.device is not None:
            t = t.to(device=self.device or t.device, dtype=self.dtype or t.dtype)
        return t

    @property
    def rows(self) -> int:
        """Recorded rows (batch rows of all calls), kept as factors or folded."""
        return self.folded_rows + sum(int(q.shape[0]) for q, _ in self.chunks)

    @property
    def heads(self) -> int:
        return self._shape[0] if self._shape else 0

    @property
    def queries(self) -> int:
        return self._shape[1] if self._shape else 0

    @property
    def factor_nbytes(self) -> int:
        """Bytes held by the kept (not yet folded) q/k factors."""
        return sum(q.numel() * q.element_size() + k.numel() * k.element_size() for q, k in self.chunks)

    @property
    def nbytes(self) -> int:
        """Bytes held for this layer: the kept factors plus the folded map, if any."""
        folded = 0 if self.folded is None else self.folded.numel() * self.folded.element_size()
        return self.factor_nbytes + folded

    @property
    def map_nbytes(self) -> int:
        """Bytes of this layer's explicit float32 ``(Q, value_keys)`` mean map (what the explicit path keeps)."""
        return self.queries * self.value_keys * 4

    def fold(self, block_bytes: int = 8 * 2**20) -> None:
        """Fold every kept factor into an explicit map and free the factors.

        The map is the sum over the folded rows and heads of ``softmax(q k^T * scale)`` restricted
        to the value keys, computed in float32 in blocks of query rows (at most ``block_bytes`` of
        probabilities at once) -- the explicit path's computation, done later. :meth:`apply` then
        uses the map for these rows and SDPA for rows recorded afterwards; the result is the same
        operator (up to float32 rounding). Used when a memory budget is reached
        (:attr:`AttentionStore.factor_budget`): the layer then holds what the explicit path holds.
        """
        if not self.chunks:
            return
        heads, n_q, n_keys = self._shape
        device = self.chunks[0][0].device
        if self.folded is None:
            self.folded = torch.zeros(n_q, self.value_keys, dtype=torch.float32, device=device)
        block = max(1, block_bytes // max(heads * n_keys * 4, 1))
        for query, key in self.chunks:
            for b in range(query.shape[0]):
                k_t = key[b].to(torch.float32).transpose(-1, -2)
                for start in range(0, n_q, block):
                    logits = query[b, :, start : start + block].to(torch.float32) @ k_t
                    probs = torch.softmax(logits * self.scale, dim=-1)
                    self.folded[start : start + block] += probs.sum(dim=0)[:, : self.value_keys].to(device)
            self.folded_rows += int(query.shape[0])
        self.chunks.clear()

    # ------------------------------------------------------------------ use
    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """``(value_keys, C)`` values -> ``(Q, C)`` float32: the mean self map times ``values``."""
        if not self.rows:
            raise ValueError(f"layer {self.name}: no self-attention factors were recorded")
        if values.ndim != 2 or values.shape[0] != self.value_keys:
            raise ValueError(f"layer {self.name}: values {tuple(values.shape)} do not match its "
                             f"{self.value_keys} value keys")
        device = values.device
        heads, n_q = self.heads, self.queries
        folded = None
        if self.folded is not None:
            folded = self.folded.to(device) @ values.to(device=device, dtype=torch.float32)
        if not self.chunks:
            return folded / (self.rows * heads)
        # the operator is linear, so each column can run at unit scale: calibrated maps
        # (A ** (1/S), min-maxed) hold values down to 1e-43, and their products with the
        # probabilities are float32 subnormals, on which x86 vector units stall (on the toy model
        # 13 ms instead of 2-3 ms per image, docs/backbones.md). What is dropped is below
        # 2**-64 of the column's largest value: the result moves by less than that, relative.
        col_max = values.detach().abs().amax(dim=0).to(device=device, dtype=torch.float32)
        col_scale = torch.where(col_max > 0, col_max, torch.ones_like(col_max))
        values = values.to(device=device, dtype=torch.float32) / col_scale
        values = values.masked_fill(values.abs() < _FLUSH_BELOW, 0.0)
        d = self._head_dim
        work = self._work_dtype(device)
        n_keys = int(self.chunks[0][1].shape[2])
        c = int(values.shape[1])
        # fused CPU / flash kernels need the value width to equal the q/k head dim: the C columns
        # are padded to a multiple of it and run d at a time
        width = d * max(1, math.ceil(c / d))
        padded = torch.zeros(n_keys, width, dtype=work, device=device)
        padded[: self.value_keys, :c] = values.to(work)
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
        total = total[:, :c] * col_scale
        if folded is not None:
            total = total + folded
        return total / (self.rows * heads)

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
    ``factor_budget``: bound on what the fused path keeps: ``None`` (unbounded: grows by one
    call's q/k per collect call), a number of bytes, ``"explicit"`` (what the explicit path keeps
    for the same layers: one float32 ``(Q, value_keys)`` map each) or ``"auto"`` (below the explicit
    path's peak for the same layers and batch: those maps plus half of its largest per-call
    transient, the float32 head-mean ``(batch, Q, value_keys)`` block). When the kept bytes
    pass it, the layers holding the most factors are folded into explicit maps
    (:meth:`SelfAttentionFactors.fold`) until they fit or nothing is left to fold.
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
    factor_budget: int | str | None = None
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
        self._keep_within_budget()

    def factor_budget_bytes(self) -> int | None:
        """The budget in bytes (``None`` = unbounded); ``"explicit"`` counts the layers seen so far."""
        if self.factor_budget is None:
            return None
        if self.factor_budget in ("explicit", "auto"):
            kept = sum(f.map_nbytes for f in self._factors.values())
            if self.factor_budget == "explicit" or not self._factors:
                return kept
            # half of one call's float32 head-mean block: at SD1.5 size on a CPU the explicit path's
            # measured peak was its maps plus ~0.86 of that block (benchmarks/speed.py --memory-only);
            # the budget stays below it by a margin larger than the run-to-run noise of RSS peaks
            return kept + max(f.max_call_rows * f.map_nbytes for f in self._factors.values()) // 2
        if isinstance(self.factor_budget, bool) or not isinstance(self.factor_budget, (int, float)) \
                or self.factor_budget < 0:
            raise ValueError(f"factor_budget must be None, 'explicit', 'auto' or a number of bytes >= 0, "
                             f"got {self.factor_budget!r}")
        return int(self.factor_budget)

    def _keep_within_budget(self) -> None:
        budget = self.factor_budget_bytes()
        if budget is None:
            return
        while self.factor_bytes() > budget:
            # fold the layer with the most kept factors first: it frees the most per explicit softmax
            kept = [f for f in self._factors.values() if f.chunks]
            if not kept:
                break
            max(kept, key=lambda f: f.factor_nbytes).fold()

    def folded_rows(self) -> int:
        """Rows (over all layers) that were folded into explicit maps to stay within the budget."""
        return sum(f.folded_rows for f in self._factors.values())

    @property
    def self_factors(self) -> dict[str, SelfAttentionFactors]:
        """Fused self-attention factors per layer name (filled when ``self_maps == "fused"``)."""
        return dict(self._factors)

    def factor_bytes(self) -> int:
        """Bytes held by all kept self-attention factors (and maps folded from them)."""
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
