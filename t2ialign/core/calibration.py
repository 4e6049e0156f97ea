"""Alignment scores from per-class ELBO losses, and the calibration of attention maps with them.

Method-spec §5. Given the per-class losses ``L_i`` of one image (lower = better explained):

* ``m_i = (L_i - min L) / (max L - min L + 1e-10)`` in ``[0, 1]`` (0 = best-explained class);
* alignment score ``S_i = gamma ** m_i`` in ``[gamma, 1]`` (the reference ``elbo_strength`` is
  ``1 / gamma``; ``gamma = 1`` disables calibration);
* calibration ``A_i <- minmax(A_i) ** (1 / S_i)``: the best-explained class is untouched and the
  worst-explained one is raised to ``1 / gamma``, which suppresses its diffuse low values.

Only differences between classes matter here, so ``S`` is invariant to adding a constant to all
losses or scaling them by a positive factor (the ``uniform`` and ``elbo`` weightings differ in
more than that, see ``docs/elbo.md``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from t2ialign.core.errors import ConfigError, InputError

#: the reference min-max epsilon of the ELBO normalisation
MINMAX_EPS = 1e-10


def minmax(x: torch.Tensor, dim: int | Sequence[int] | None = None, eps: float = MINMAX_EPS) -> torch.Tensor:
    """``(x - min) / (max - min + eps)`` over ``dim`` (all elements when ``None``).

    A constant slice maps to zeros instead of ``0 / 0``: the reference normalises attention maps
    without an epsilon and gets NaN for a constant map (method-spec §15.10); a map that carries
    no information should neither win nor poison the argmax. Half-precision input is normalised
    in float32 (``eps`` would underflow in float16) and returned in its own dtype.
    """
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point() else x
    if dim is None:
        lo, hi = work.min(), work.max()
    else:
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        lo = work.amin(dim=dims, keepdim=True)
        hi = work.amax(dim=dims, keepdim=True)
    span = hi - lo
    scaled = (work - lo) / (span + eps)
    out = torch.where(span > 0, scaled, torch.zeros_like(scaled))
    return out.to(out_dtype)


def _check_gamma(gamma: float) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0.0 < float(gamma) <= 1.0):
        raise ConfigError(
            f"gamma must be a number in (0, 1], got {gamma!r}",
            where="alignment score gamma",
            fix="use gamma = 1 / elbo_strength, e.g. 1/3 (reference default); gamma = 1 disables calibration",
        )
    return float(gamma)


def alignment_scores(losses: torch.Tensor, gamma: float) -> torch.Tensor:
    """``S_i = gamma ** minmax(L)_i`` for the per-class losses ``L`` of one image, shape ``(C,)``.

    The lowest loss gets ``S = 1``, the highest ``S = gamma``. One class, equal losses or
    ``gamma = 1`` give all ones (no calibration), never NaN.
    """
    gamma = _check_gamma(gamma)
    losses = torch.as_tensor(losses)
    if losses.dim() != 1 or losses.numel() == 0:
        raise InputError(f"losses must be a non-empty 1-D tensor (one value per class), got shape "
                         f"{tuple(losses.shape)}", where="alignment_scores",
                         fix="pass ELBOResult.loss of one image")
    if not torch.isfinite(losses).all():
        raise InputError(f"losses contain NaN or Inf: {losses.tolist()}", where="alignment_scores",
                         fix="check the ELBO estimate of this image (NumericalError upstream?)")
    m = minmax(losses.double())
    return torch.pow(torch.tensor(gamma, dtype=torch.float64), m).float()


def fixed_scores(n: int, gamma: float) -> torch.Tensor:
    """The fixed-S ablation (reference ``fix_temperature=True``): every class gets ``S = gamma``."""
    gamma = _check_gamma(gamma)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"number of classes must be a non-negative integer, got {n!r}",
                         where="fixed_scores", fix="pass len(classes)")
    return torch.full((n,), gamma, dtype=torch.float32)


def calibrate(
    maps: torch.Tensor,
    scores: torch.Tensor,
    prefactor_exponent: float | None = None,
) -> torch.Tensor:
    """Calibrate per-class attention maps: ``minmax(A_i) ** (1 / S_i)`` (times ``S_i ** (1/p)``).

    ``maps``: ``(C, ...)``, one map per class, each min-max normalised to ``[0, 1]`` over all its
    elements first. ``scores``: ``(C,)`` alignment scores in ``(0, 1]``.

    ``prefactor_exponent`` (``p``): the paper's Algorithm 1 writes ``S_i^{1/p} * A_i^{1/S_i}``;
    the released code has no prefactor, hence the default ``None``. In the released pipeline the
    prefactor is a no-op: the calibrated map is next propagated with the aggregated
    self-attention, a *linear* map (``K @ a``), and the result is min-max normalised *per class*;
    ``minmax(c * y) == minmax(y)`` for any ``c > 0``, so a positive per-class scalar such as
    ``S_i^{1/p}`` cancels exactly. It only matters to consumers that compare un-normalised
    calibrated maps across classes.
    """
    maps = torch.as_tensor(maps)
    scores = torch.as_tensor(scores)
    if maps.dim() < 2:
        raise InputError(f"maps must be (C, ...) with at least one map dimension, got shape {tuple(maps.shape)}",
                         where="calibrate", fix="stack one map per class along dim 0")
    if scores.dim() != 1 or scores.shape[0] != maps.shape[0]:
        raise InputError(f"scores shape {tuple(scores.shape)} does not match {maps.shape[0]} class maps",
                         where="calibrate", fix="pass one alignment score per class map, in the same order")
    if not (torch.isfinite(scores).all() and (scores > 0).all() and (scores <= 1).all()):
        raise InputError(f"alignment scores must lie in (0, 1], got {scores.tolist()}", where="calibrate",
                         fix="compute them with alignment_scores() or fixed_scores()")
    if prefactor_exponent is not None and (not math.isfinite(prefactor_exponent) or prefactor_exponent == 0):
        raise ConfigError(f"prefactor_exponent must be a finite non-zero number or None, got {prefactor_exponent!r}",
                          where="calibrate", fix="use None (reference code) or the paper's p")
    dims = tuple(range(1, maps.dim()))
    normed = minmax(maps, dim=dims)
    shape = (-1,) + (1,) * (maps.dim() - 1)
    s = scores.to(device=normed.device, dtype=normed.dtype).reshape(shape)
    out = normed ** (1.0 / s)
    if prefactor_exponent is not None:
        out = out * s ** (1.0 / prefactor_exponent)
    return out
