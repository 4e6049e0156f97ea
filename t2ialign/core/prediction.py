"""What a denoiser's native prediction means: the prediction types and their conversion to noise.

Backbones predict ``epsilon`` (the noise), ``v_prediction`` (``v = alpha * eps - sigma * z0``)
or ``flow`` (rectified-flow velocity ``v = eps - z0``). The ELBO weightings (in epsilon space)
and the DDIM sampler (:mod:`t2ialign.core.sampling`) both need the noise estimate a prediction
implies; :func:`eps_from_prediction` is the one conversion the toolkit uses for it.
"""

from __future__ import annotations

import torch

from t2ialign.core.errors import ConfigError

#: the native prediction types the built-in weightings and the sampler understand
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


def eps_from_prediction(
    prediction_type: str, pred: torch.Tensor, z_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The noise estimate implied by a native prediction at ``z_t = alpha * z0 + sigma * eps``.

    * epsilon: the prediction itself;
    * v_prediction (``v = alpha * eps - sigma * z0``): ``eps = (alpha * v + sigma * z_t) / (alpha^2 + sigma^2)``,
      which is the familiar ``alpha * v + sigma * z_t`` on variance-preserving schedules;
    * flow (``v = eps - z0``): ``eps = (z_t + alpha * v) / (alpha + sigma)``, i.e. ``z_t + (1 - sigma) * v``
      for rectified flow where ``alpha = 1 - sigma``.

    The general forms cost nothing and stay exact should a backbone's schedule not be exactly
    variance-preserving / ``alpha + sigma = 1`` (e.g. float rounding of ``alphas_cumprod``).
    """
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return (alpha * pred + sigma * z_t) / (alpha * alpha + sigma * sigma)
    if prediction_type == "flow":
        return (z_t + alpha * pred) / (alpha + sigma)
    raise ConfigError(f"unknown prediction type '{prediction_type}'", where="weightings",
                      fix=f"use one of {PREDICTION_TYPES} or install a plugin that handles it")


__all__ = ["PREDICTION_TYPES", "eps_from_prediction"]
