"""Layer aggregation of captured attention maps (method-spec §6.4 and §7.2), model-agnostic.

Cross-attention: every cross layer's class map is reshaped to its grid, bilinearly upsampled to
the output grid ``R x R`` and averaged with per-layer weights. Weights come either from one
weight per *resolution group* (the reference ``cross_weight``) or from a Gaussian over layer
depth centred on the middle of the network (``cross_gaussian_var`` of the reference, used as a
standard deviation).

Self-attention: each self layer's ``(Q, Q)`` map becomes an ``(M, M)`` matrix on the output grid
(key dims bilinearly upsampled, query dims nearest-repeated); each weight row averages layers into
one matrix ``K_k``, and the rows are chained ``K = K_{n-1} ... K_1 K_0``. :func:`propagate` then
spreads class maps with ``K``.

The propagation is linear in the class maps ``a``: a layer contributes ``R A_l U^T a`` (``U`` the
key-dim bilinear upsampling, ``R`` the nearest query repeat), so :class:`SelfPropagation` gets
the same result without any ``(Q, Q)`` or ``(M, M)`` matrix: ``U^T`` brings the maps to the
layer's key grid, the layer's recorded attention factors apply ``A_l`` as one attention product
with the maps as values (``SelfAttentionFactors.apply``), ``R`` repeats the rows, and layer
weights and chained steps follow as in :func:`self_steps`.

Layers are described by :class:`~t2ialign.core.protocols.LayerInfo`; MM-DiT ``joint`` layers
provide both cross and self maps, so they count as both kinds here.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F

from t2ialign.core.errors import ConfigError, InputError
from t2ialign.core.protocols import LayerInfo

CROSS_KINDS = ("cross", "joint")
SELF_KINDS = ("self", "joint")


def _groups(layers: Sequence[LayerInfo], kinds: Sequence[str]) -> list[tuple[int, tuple[int, int], int]]:
    """``(group, grid, number of layers)`` of the layers of ``kinds``, in group order."""
    seen: dict[int, list] = {}
    for layer in layers:
        if layer.kind in kinds:
            entry = seen.setdefault(layer.group, [layer.grid, 0])
            entry[1] += 1
    return [(g, tuple(seen[g][0]), seen[g][1]) for g in sorted(seen)]  # type: ignore[misc]


def _describe(groups: list[tuple[int, tuple[int, int], int]]) -> str:
    return ", ".join(f"group {g}: {h}x{w} ({n} layers)" for g, (h, w), n in groups)


def cross_layer_weights(
    layers: Sequence[LayerInfo],
    *,
    group_weights: Sequence[float] | None,
    gaussian_sigma: float,
) -> torch.Tensor:
    """One weight per entry of ``layers`` (zero for non-cross layers), normalised to sum 1.

    ``gaussian_sigma > 0``: ``w_l = exp(-(l - l_mid)^2 / (2 sigma^2))`` over the cross-layer depth
    ``l``, with ``l_mid = #down + (#mid - 1) / 2`` (cross layers), or ``(L - 1) / 2`` for models
    without down/mid blocks. Otherwise ``group_weights[g]`` for each layer of resolution group
    ``g`` (``None``: all layers equal).
    """
    cross = [i for i, layer in enumerate(layers) if layer.kind in CROSS_KINDS]
    if not cross:
        raise ConfigError("no cross-attention layers to aggregate",
                          fix="pass the backbone's attention_layers()")
    weights = torch.zeros(len(layers), dtype=torch.float64)
    if gaussian_sigma and gaussian_sigma > 0:
        n_down = sum(1 for i in cross if layers[i].place == "down")
        n_mid = sum(1 for i in cross if layers[i].place == "mid")
        # the Gaussian is centred on the bottleneck of a UNet, on the middle layer otherwise
        l_mid = n_down + (n_mid - 1) / 2 if (n_down or n_mid) else (len(cross) - 1) / 2
        depth = torch.tensor([float(layers[i].depth) for i in cross], dtype=torch.float64)
        weights[cross] = torch.exp(-((depth - l_mid) ** 2) / (2 * float(gaussian_sigma) ** 2))
    elif group_weights is None:
        weights[cross] = 1.0
    else:
        groups = _groups(layers, CROSS_KINDS)
        if len(group_weights) != len(groups):
            raise ConfigError(
                f"cross_weight has {len(group_weights)} values but this model has {len(groups)} "
                f"cross-attention resolution groups ({_describe(groups)})",
                where="cross_weight",
                fix=f"give {len(groups)} weights, one per group, or set cross_gaussian_sigma > 0",
            )
        if any(float(w) < 0 for w in group_weights):
            raise ConfigError(f"cross_weight must not be negative, got {list(group_weights)}",
                              where="cross_weight")
        index = {g: k for k, (g, _, _) in enumerate(groups)}
        for i in cross:
            weights[i] = float(group_weights[index[layers[i].group]])
    total = weights.sum()
    if total <= 0:
        raise ConfigError(f"every cross-attention layer got weight 0 (cross_weight={list(group_weights or [])})",
                          where="cross_weight", fix="give at least one resolution group a positive weight")
    return (weights / total).float()


def self_layer_weights(layers: Sequence[LayerInfo], rows: Sequence[Sequence[float]]) -> torch.Tensor:
    """``(n_rows, len(layers))`` weights: ``rows[k][g]`` for each self layer of group ``g``.

    Rows are not normalised (that happens over the captured layers in :func:`aggregate_self`).
    """
    groups = _groups(layers, SELF_KINDS)
    if not groups:
        raise ConfigError("no self-attention layers to aggregate", fix="pass the backbone's attention_layers()")
    if not rows:
        raise ConfigError("self_weight has no rows", where="self_weight",
                          fix=f"give at least one row of {len(groups)} weights ({_describe(groups)})")
    index = {g: k for k, (g, _, _) in enumerate(groups)}
    out = torch.zeros(len(rows), len(layers), dtype=torch.float64)
    for k, row in enumerate(rows):
        if len(row) != len(groups):
            raise ConfigError(
                f"self_weight row {k} has {len(row)} values but this model has {len(groups)} "
                f"self-attention resolution groups ({_describe(groups)})",
                where=f"self_weight[{k}]",
                fix=f"give {len(groups)} weights per row",
            )
        for i, layer in enumerate(layers):
            if layer.kind in SELF_KINDS:
                out[k, i] = float(row[index[layer.group]])
        if (out[k] < 0).any():
            raise ConfigError(f"self_weight row {k} has negative weights: {list(row)}", where=f"self_weight[{k}]")
        if out[k].sum() <= 0:
            raise ConfigError(
                f"self_weight row {k} = {list(row)} selects no self-attention layer (all its weights are 0 "
                f"on the groups that exist: {_describe(groups)}); the reference code divides 0 by 0 here",
                where=f"self_weight[{k}]",
                fix="give each row a positive weight for at least one group",
            )
    return out.float()


def needed_layers(layers: Sequence[LayerInfo], weights: torch.Tensor) -> list[str]:
    """Names of layers with a non-zero weight (``weights``: ``(L,)`` or rows ``(n, L)``).

    Only these need to be captured; the others keep the fused attention path.
    """
    w = weights if weights.ndim == 1 else weights.abs().sum(dim=0)
    if w.shape[0] != len(layers):
        raise ValueError(f"weights cover {w.shape[0]} layers, expected {len(layers)}")
    return [layer.name for layer, wi in zip(layers, w.tolist()) if wi != 0]


def _missing(name: str) -> InputError:
    return InputError(
        f"no captured attention map for layer '{name}', which has a non-zero weight",
        fix="capture needed_layers(layers, weights) with the attention extractor",
    )


def aggregate_cross(
    maps: dict[str, torch.Tensor],
    layers: Sequence[LayerInfo],
    weights: torch.Tensor,
    out_grid: tuple[int, int],
) -> torch.Tensor:
    """Weighted mean of cross maps on ``out_grid``.

    ``maps[name]``: ``(..., Q, K)`` with ``Q = h * w`` of that layer's grid (leading batch dims
    allowed). Returns ``(..., K, R_h, R_w)``.
    """
    total: torch.Tensor | None = None
    weight_sum = 0.0
    for layer, w in zip(layers, weights.tolist()):
        if w == 0 or layer.kind not in CROSS_KINDS:
            continue
        if layer.name not in maps:
            raise _missing(layer.name)
        m = maps[layer.name].float()
        h, w_ = layer.grid
        if m.shape[-2] != h * w_:
            raise InputError(f"map of layer '{layer.name}' has {m.shape[-2]} queries, its grid {h}x{w_} "
                             f"needs {h * w_}", fix="capture and aggregate maps of the same backbone")
        lead = m.shape[:-2]
        k = m.shape[-1]
        img = m.reshape(-1, h, w_, k).permute(0, 3, 1, 2)  # (N, K, h, w)
        if (h, w_) != tuple(out_grid):
            img = F.interpolate(img, size=tuple(out_grid), mode="bilinear", align_corners=False)
        img = img.reshape(*lead, k, *out_grid)
        total = img * w if total is None else total + img * w
        weight_sum += w
    if total is None:
        raise ConfigError("all cross-attention layers have weight 0", fix="check cross_weight")
    return total / weight_sum


def self_to_output_grid(m: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int]) -> torch.Tensor:
    """One ``(Q, Q)`` self map on ``grid`` -> ``(M, M)`` on ``out_grid``.

    Key dims are bilinearly upsampled, query dims nearest-repeated (each output pixel takes the
    row of the input pixel it falls in), as in the reference.
    """
    h, w = grid
    rh, rw = out_grid
    if (h, w) == (rh, rw):
        return m
    q = h * w
    keys = m.reshape(q, 1, h, w)
    keys = F.interpolate(keys, size=(rh, rw), mode="bilinear", align_corners=False).reshape(h, w, rh * rw)
    rows = keys.permute(2, 0, 1).unsqueeze(0)  # (1, M, h, w): query dims as an image
    rows = F.interpolate(rows, size=(rh, rw), mode="nearest").reshape(rh * rw, rh * rw)
    return rows.t().contiguous()


def self_steps(
    maps: dict[str, torch.Tensor],
    layers: Sequence[LayerInfo],
    rows: Sequence[Sequence[float]],
    out_grid: tuple[int, int],
) -> list[torch.Tensor]:
    """The step operators ``[K_0, K_1, ...]`` of :func:`aggregate_self`, each ``(M, M)``, not multiplied.

    ``propagate(steps, maps)`` applies them one after the other: ``C`` matrix-vector products
    per step instead of one ``M x M x M`` matrix product (137 GFLOP for SD1.5's 4096 x 4096).
    """
    row_weights = self_layer_weights(layers, rows)
    converted: dict[str, torch.Tensor] = {}
    steps: list[torch.Tensor] = []
    for k in range(row_weights.shape[0]):
        acc: torch.Tensor | None = None
        for layer, w in zip(layers, row_weights[k].tolist()):
            if w == 0:
                continue
            if layer.name not in maps:
                raise _missing(layer.name)
            if layer.name not in converted:
                m = maps[layer.name].float()
                if m.ndim == 3 and m.shape[0] == 1:
                    m = m[0]
                if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != layer.grid[0] * layer.grid[1]:
                    raise InputError(f"self map of layer '{layer.name}' has shape {tuple(m.shape)}, expected "
                                     f"({layer.grid[0] * layer.grid[1]},) * 2",
                                     fix="aggregate one image at a time")
                converted[layer.name] = self_to_output_grid(m, layer.grid, out_grid)
            acc = converted[layer.name] * w if acc is None else acc + converted[layer.name] * w
        steps.append(acc / row_weights[k].sum())  # type: ignore[operator]
    return steps


def aggregate_self(
    maps: dict[str, torch.Tensor],
    layers: Sequence[LayerInfo],
    rows: Sequence[Sequence[float]],
    out_grid: tuple[int, int],
) -> torch.Tensor:
    """The chained self-attention operator ``K = K_{n-1} ... K_0`` of shape ``(M, M)``.

    ``maps[name]``: ``(Q, Q)`` head/time-averaged self maps (a leading batch dim of 1 is
    accepted). ``rows[k][g]`` weighs resolution group ``g`` in step ``k``.
    """
    result: torch.Tensor | None = None
    for step in self_steps(maps, layers, rows, out_grid):
        result = step if result is None else step @ result
    return result  # type: ignore[return-value]


class SelfOperator(Protocol):
    """One layer's head/time-averaged self-attention as a linear map (``SelfAttentionFactors``)."""

    queries: int
    value_keys: int

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """``(value_keys, C)`` -> ``(queries, C)``: the mean self map times ``values``."""


def linear_weights(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)`` weights of 1-D linear upsampling with ``align_corners=False``.

    Bilinear resizing is separable, so ``U = U_h (x) U_w`` with these factors is exactly the
    ``F.interpolate(..., mode="bilinear", align_corners=False)`` of :func:`self_to_output_grid`.
    """
    eye = torch.eye(n_in, dtype=torch.float32)[:, None, :]  # n_in signals, each one unit impulse
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :].t().contiguous()


def key_adjoint(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(C, R_h, R_w)`` maps on the output grid -> ``(C, h, w)``: the adjoint ``U^T`` of the
    key-dim bilinear upsampling of :func:`self_to_output_grid` from ``grid``."""
    h, w = grid
    c, rh, rw = maps.shape
    if (h, w) == (rh, rw):
        return maps
    uh = linear_weights(h, rh).to(maps.device)  # (rh, h)
    uw = linear_weights(w, rw).to(maps.device)  # (rw, w)
    return uh.t() @ maps.float() @ uw


def query_repeat(maps: torch.Tensor, out_grid: tuple[int, int]) -> torch.Tensor:
    """``(C, h, w)`` -> ``(C, R_h, R_w)``: each output pixel takes the value of the query pixel it
    falls in (the nearest query repeat of :func:`self_to_output_grid`)."""
    if tuple(maps.shape[-2:]) == tuple(out_grid):
        return maps
    return F.interpolate(maps[None], size=tuple(out_grid), mode="nearest")[0]


class SelfPropagation:
    """``K a`` for class maps ``a`` without forming ``K`` or any layer's ``(Q, Q)`` map.

    ``operators[name]``: a :class:`SelfOperator` per self layer (the fused capture's
    ``store.self_factors``); ``rows`` and ``out_grid`` as in :func:`self_steps`, with the same
    result up to float rounding: step ``k`` maps ``x`` to
    ``sum_l w_kl R_l A_l U_l^T x / sum_l w_kl``, steps applied ``K_0`` first.
    """

    def __init__(self, operators: dict[str, Any], layers: Sequence[LayerInfo], rows: Sequence[Sequence[float]],
                 out_grid: tuple[int, int]) -> None:
        self.row_weights = self_layer_weights(layers, rows)
        self.layers = list(layers)
        self.out_grid = tuple(out_grid)
        self.operators: dict[str, Any] = {}
        for layer, w in zip(self.layers, self.row_weights.abs().sum(dim=0).tolist()):
            if w == 0:
                continue
            if layer.name not in operators:
                raise _missing(layer.name)
            op = operators[layer.name]
            q = layer.grid[0] * layer.grid[1]
            if op.queries != q or op.value_keys != q:
                raise InputError(f"self-attention factors of layer '{layer.name}' have {op.queries} queries and "
                                 f"{op.value_keys} image keys, its grid {layer.grid[0]}x{layer.grid[1]} needs {q}",
                                 fix="capture and aggregate the same backbone at the same image size")
            self.operators[layer.name] = op

    @property
    def steps(self) -> int:
        return int(self.row_weights.shape[0])

    def _layer(self, layer: LayerInfo, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[0]
        values = key_adjoint(x, layer.grid).reshape(c, -1).t()  # (Q, C)
        y = self.operators[layer.name].apply(values).t().reshape(c, *layer.grid)
        return query_repeat(y, self.out_grid)

    def __call__(self, maps: torch.Tensor) -> torch.Tensor:
        """``(C, R_h, R_w)`` -> ``(C, R_h, R_w)`` float32."""
        if tuple(maps.shape[-2:]) != self.out_grid or maps.ndim != 3:
            raise InputError(f"maps of shape {tuple(maps.shape)} do not lie on the {self.out_grid} output grid",
                             fix="aggregate self and cross maps to the same out_grid")
        x = maps.float()
        for k in range(self.steps):
            acc: torch.Tensor | None = None
            for layer, w in zip(self.layers, self.row_weights[k].tolist()):
                if w == 0:
                    continue
                y = self._layer(layer, x) * w
                acc = y if acc is None else acc + y
            x = acc / float(self.row_weights[k].sum())  # type: ignore[operator]
        return x


def propagate(K: torch.Tensor | Sequence[torch.Tensor] | SelfPropagation, maps: torch.Tensor) -> torch.Tensor:
    """``h_c = K vec(A_c)`` for each class map: ``(M, M)`` x ``(C, R_h, R_w)`` -> ``(C, R_h, R_w)``.

    ``K`` is the chained operator, the list of its steps ``[K_0, K_1, ...]`` (:func:`self_steps`),
    applied ``K_0`` first -- the same result without forming the product -- or a
    :class:`SelfPropagation` (no ``(M, M)`` matrix at all).
    """
    if isinstance(K, SelfPropagation):
        return K(maps)
    c, rh, rw = maps.shape
    steps = [K] if isinstance(K, torch.Tensor) else list(K)
    x = maps.reshape(c, rh * rw)
    for step in steps:
        if step.shape != (rh * rw, rh * rw):
            raise InputError(f"self-attention operator {tuple(step.shape)} does not match maps on a {rh}x{rw} grid",
                             fix="aggregate self and cross maps to the same out_grid")
        x = x.to(step.dtype) @ step.t()
    return x.reshape(c, rh, rw)
