"""An analytic backbone for validating ELBO estimators against exact likelihoods.

Its data law per class is ``x ~ N(mu_c, s^2 I)`` and its denoiser is the EXACT posterior mean
for the conditioning class, written in the epsilon, v and flow parametrisations. For such a
model the continuous-time ELBO is tight, so the ``elbo`` scheme must recover
``log N(x; mu_1, s^2 I) - log N(x; mu_2, s^2 I)`` up to Monte-Carlo error (and a truncation bias
outside the schedule's log-SNR range, computed in closed form). Used by
``tests/core/test_elbo.py`` and ``benchmarks/elbo_accuracy.py``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from t2ialign.core.elbo import ELBOResult, estimate_class_losses
from t2ialign.core.protocols import LayerInfo, TextCond
from t2ialign.core.timesteps import parse_timesteps
from t2ialign.plugins.weightings import ELBOWeighting

LATENT = (4, 4, 4)  # d = 64


def sd_log_snr_table(n: int = 1000) -> torch.Tensor:
    """log-SNR of SD1.x's scaled-linear DDPM schedule at integer timesteps (float64)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    return torch.log(abar) - torch.log1p(-abar)


class GaussianBackbone:
    """Backbone whose class-conditional data law is ``N(mu_c, s^2 I)`` and whose denoiser is exact.

    ``prediction_type`` ``epsilon`` / ``v_prediction`` use SD1.x's scaled-linear VP schedule with
    log-SNR linearly interpolated between integer timesteps; ``flow`` uses SD3's shifted
    rectified-flow table ``sigma = 3 s / (1 + 2 s)``, ``s = (t + 1) / 1000``, ``alpha = 1 - sigma``.
    ``encode_text(["c0", "c2"])`` returns the class means of classes 0 and 2 as embeddings.
    """

    attention_kind = "unet"
    device = torch.device("cpu")
    dtype = torch.float32
    image_size = 16
    num_train_timesteps = 1000
    max_tokens = 1

    def __init__(self, prediction_type: str, means: torch.Tensor, s: float, nan_at: float | None = None):
        self.name = f"gaussian-{prediction_type}"
        self.prediction_type = prediction_type
        self.means = means.double()  # (K, d)
        self.s = float(s)
        self.nan_at = nan_at  # make predict return NaN for t >= nan_at (error-path tests)
        self.denoiser = torch.nn.Identity()
        self._table = sd_log_snr_table(self.num_train_timesteps)

    # ---------------------------------------------------------------- schedule
    def _flow_sigma(self, t: torch.Tensor) -> torch.Tensor:
        s = (t.double() + 1.0) / self.num_train_timesteps
        return 3.0 * s / (1.0 + 2.0 * s)

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.prediction_type == "flow":
            sigma = self._flow_sigma(t)
            return 2.0 * (torch.log1p(-sigma) - torch.log(sigma))
        lo = t.floor().clamp(0, self.num_train_timesteps - 2).long()
        frac = t - lo
        return self._table[lo] * (1 - frac) + self._table[lo + 1] * frac

    def _alpha_sigma64(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.prediction_type == "flow":
            sigma = self._flow_sigma(t)
            return 1.0 - sigma, sigma
        lam = self.log_snr(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = self._alpha_sigma64(t)
        return alpha.float(), sigma.float()

    def add_noise(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma64(t)
        shape = (-1,) + (1,) * (z0.dim() - 1)
        return (alpha.reshape(shape) * z0.double() + sigma.reshape(shape) * noise.double()).float()

    # ---------------------------------------------------------------- model
    def encode_text(self, prompts: Sequence[str]) -> TextCond:
        rows = [int(p.removeprefix("c")) for p in prompts]
        return TextCond(embeds=self.means[rows].float()[:, None, :])

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        b = z_t.shape[0]
        alpha, sigma = (v.reshape(b, 1) for v in self._alpha_sigma64(t))
        z = z_t.double().reshape(b, -1)
        mu = cond.embeds[:, 0, :].double()
        var = alpha ** 2 * self.s ** 2 + sigma ** 2
        resid = z - alpha * mu
        eps_hat = sigma * resid / var                       # E[eps | z, c]
        x_hat = mu + alpha * self.s ** 2 * resid / var      # E[x | z, c]
        if self.prediction_type == "epsilon":
            out = eps_hat
        elif self.prediction_type == "v_prediction":
            out = alpha * eps_hat - sigma * x_hat
        else:
            out = eps_hat - x_hat
        if self.nan_at is not None:
            out = torch.where(torch.as_tensor(t).reshape(b, 1) >= self.nan_at, torch.nan, out)
        return out.float().reshape(z_t.shape)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("the analytic backbone works on latents directly")

    def token_spans(self, prompt: str, phrase: str) -> list[int]:
        return [0]

    def attention_layers(self) -> list[LayerInfo]:
        return []

    # ---------------------------------------------------------------- closed forms
    def log_lik_diff(self, x: torch.Tensor, i: int, j: int) -> float:
        """Exact ``log N(x; mu_i, s^2 I) - log N(x; mu_j, s^2 I)``."""
        x = x.double().reshape(-1)
        return float(((x - self.means[j]).pow(2).sum() - (x - self.means[i]).pow(2).sum()) / (2 * self.s ** 2))

    def lambda_range(self) -> tuple[float, float]:
        t = torch.linspace(0, self.num_train_timesteps - 1, 8 * (self.num_train_timesteps - 1) + 1)
        lam = self.log_snr(t)
        lam = lam[torch.isfinite(lam)]
        return float(lam.min()), float(lam.max())

    def truncated_log_lik_diff(self, x: torch.Tensor, i: int, j: int) -> float:
        """What the ELBO integral restricted to the schedule's lambda range gives.

        ``1/2 * int r/(1 + r s^2)^2 dlambda`` over ``[lo, hi]`` (``r = e^lambda``) is
        ``(1/(1 + e^lo s^2) - 1/(1 + e^hi s^2)) / (2 s^2)`` times the squared-distance difference.
        """
        lo, hi = self.lambda_range()
        s2 = self.s ** 2
        kept = (1 / (1 + math.exp(lo) * s2) - 1 / (1 + math.exp(hi) * s2))
        return self.log_lik_diff(x, i, j) * kept


def gaussian_problem(prediction_type: str, *, n_classes: int = 3, s: float = 0.6, spread: float = 0.35,
                     seed: int = 7) -> tuple[GaussianBackbone, torch.Tensor, TextCond]:
    """A backbone, an image latent drawn from class 0, and the encoded class prompts."""
    gen = torch.Generator().manual_seed(seed)
    d = math.prod(LATENT)
    means = spread * torch.randn(n_classes, d, generator=gen, dtype=torch.float64)
    backbone = GaussianBackbone(prediction_type, means, s)
    x = (means[0] + s * torch.randn(d, generator=gen, dtype=torch.float64)).float().reshape(1, *LATENT)
    cond = backbone.encode_text([f"c{k}" for k in range(n_classes)])
    return backbone, x, cond


def elbo_estimate(
    prediction_type: str, n_timesteps: int, seed: int = 0
) -> tuple[GaussianBackbone, torch.Tensor, ELBOResult]:
    """``elbo``-scheme estimate on :func:`gaussian_problem` (the grid's values are unused, only its size)."""
    backbone, x, cond = gaussian_problem(prediction_type)
    grid = parse_timesteps([["random", 0, 999, n_timesteps]], seed=seed)
    res = estimate_class_losses(backbone, ELBOWeighting(prediction_type), x, cond, grid,
                                batch_size=256, seed=seed)
    return backbone, x, res


