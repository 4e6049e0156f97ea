"""Deterministic DDIM inversion of a real image through the Backbone protocol.

Editing a real photograph with attention control needs the noise latent that the sampler would
turn back into that photograph. DDIM (eta = 0) is an ODE discretisation, so running its update
rule *backwards* -- from the clean latent towards the noisiest timestep, each time using the
prediction at the point we are leaving -- gives such a latent up to the discretisation error
(Song et al. 2021; Prompt-to-Prompt and Null-text inversion use the same step).

The schedule is exactly the sampler's (:func:`t2ialign.core.sampling.ddim_timesteps` and
:func:`~t2ialign.core.sampling.step_pairs`), walked in the other direction, and each step is
:func:`~t2ialign.core.sampling.ddim_step` with the two timesteps swapped -- that function is
direction-agnostic (``x0`` and ``eps`` estimated at the current timestep, re-noised to the other
one). Nothing here knows a model family: the backbone's ``encode_image``, ``encode_text`` and
``predict`` do the model-specific work.

The returned trajectory is listed in *sampling* order, ``latents[k]`` being the latent at the
start of sampling step ``k`` and ``latents[-1]`` the encoded image, so an editor can anchor its
source branch to ``latents[k]`` at step ``k`` and sample from ``latents[0]``.

By default the conditional prediction of the source prompt is used (guidance 1): with classifier-
free guidance the inverted ODE is no longer the one the guided sampler integrates and the
reconstruction drifts. :func:`null_text_invert` repairs that (Null-text inversion, Mokady et al.
2023, re-implemented here): the guidance-1 trajectory is kept as a *pivot*, and at every sampling
step the unconditional embedding is optimised (Adam, a few inner iterations, early stop) so that
one guided step from the current latent lands on the pivot's next latent. The optimised embedding
of each step is carried into the next step as its start, as in the paper. Only the token
embeddings are optimised (pooled / extra tensors of SDXL-like backbones keep the empty prompt's
values). Sampling with those per-step embeddings at that guidance (:func:`reconstruct`, or
``sample(..., uncond_fn=...)``) follows the pivot, so a real image can be edited under guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from t2ialign.core.errors import InputError, NumericalError
from t2ialign.core.protocols import Backbone, TextCond
from t2ialign.core.sampling import cfg, ddim_step, ddim_timesteps, encode_prompts, step_pairs


@dataclass
class Inversion:
    """A DDIM-inverted image.

    ``latents``: ``(steps + 1, C, h, w)`` float32 on the backbone device, in sampling order:
    ``latents[k]`` is the latent at timestep ``timesteps[k]`` (the start of sampling step ``k``),
    ``latents[steps]`` the encoded image ``z0`` (the sampler's end point, timestep 0).
    ``timesteps``: the visited timesteps of the sampler, noisiest first.
    ``prompt`` / ``guidance``: what the predictions were conditioned on.
    ``uncond``: for a null-text inversion, the optimised unconditional embedding of every sampling
    step (one row each); sampling ``prompt`` with them at ``guidance`` follows ``latents``.
    ``losses`` / ``iterations``: per step, the last inner loss (mean squared latent error) and how
    many optimiser iterations it took.
    """

    latents: torch.Tensor
    timesteps: list[int]
    prompt: str
    guidance: float
    uncond: list[TextCond] | None = None
    losses: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)

    @property
    def noise_latent(self) -> torch.Tensor:
        """``(1, C, h, w)``: where sampling starts to reconstruct the image."""
        return self.latents[:1]

    @property
    def z0(self) -> torch.Tensor:
        """``(1, C, h, w)``: the VAE latent of the image."""
        return self.latents[-1:]

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def image_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``H x W x 3`` uint8 (or float in ``[0, 1]``) array, or ``(1, 3, H, W)`` tensor -> ``(1, 3, H, W)`` float."""
    if isinstance(image, torch.Tensor):
        x = image.detach().float()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
            raise InputError(f"expected one RGB image tensor (1, 3, H, W), got shape {tuple(image.shape)}",
                             where="ddim_invert", fix="invert one image at a time, channels first, values in [0, 1]")
        return x
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"expected an H x W x 3 RGB image, got an array of shape {arr.shape}",
                         where="ddim_invert", fix="convert the image to RGB first (t2ialign.core.images.load_rgb does)")
    x = arr.astype(np.float32)
    if arr.dtype == np.uint8:
        x /= 255.0
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]


@torch.no_grad()
def invert_latent(
    backbone: Backbone,
    z0: torch.Tensor,
    prompt: str,
    *,
    steps: int = 50,
    guidance: float = 1.0,
    negative: str = "",
) -> Inversion:
    """Run the sampler's deterministic schedule backwards from the latent ``z0`` (``(1, C, h, w)``)."""
    if z0.ndim != 4 or z0.shape[0] != 1:
        raise InputError(f"expected one latent (1, C, h, w), got shape {tuple(z0.shape)}",
                         where="invert_latent", fix="invert one image at a time")
    if not isinstance(prompt, str):
        raise InputError(f"the inversion prompt must be a string, got {type(prompt).__name__}",
                         where="invert_latent", fix="pass the source caption of the image")
    timesteps = ddim_timesteps(backbone, steps)
    guided = float(guidance) != 1.0
    if guided:
        cond, uncond = encode_prompts(backbone, [prompt], negative)
        both = TextCond.cat([uncond, cond])
    else:
        cond = backbone.encode_text([prompt])
    z = z0.detach().float().to(backbone.device)
    path = [z]
    # sampling goes t -> t_prev; inversion goes t_prev -> t with the prediction made at t_prev
    for t, t_prev in reversed(step_pairs(timesteps)):
        if guided:
            out = backbone.predict(torch.cat([z, z]), torch.full((2,), float(t_prev), device=z.device), both)
            pred = cfg(out[1:], out[:1], guidance)
        else:
            pred = backbone.predict(z, torch.full((1,), float(t_prev), device=z.device), cond)
        z = ddim_step(backbone, z, pred, t_prev, t)
        if not torch.isfinite(z).all():
            raise NumericalError(f"NaN/Inf in the inverted latent at timestep {t}", where="DDIM inversion",
                                 fix="run the backbone in float32 and check the model weights")
        path.append(z)
    latents = torch.cat(path[::-1])
    return Inversion(latents=latents, timesteps=list(timesteps), prompt=prompt, guidance=float(guidance))


@torch.no_grad()
def ddim_invert(
    backbone: Backbone,
    image: np.ndarray | torch.Tensor,
    prompt: str,
    *,
    steps: int = 50,
    guidance: float = 1.0,
    negative: str = "",
) -> Inversion:
    """Encode ``image`` with the backbone's VAE (posterior mean) and DDIM-invert it under ``prompt``.

    ``image``: ``H x W x 3`` uint8 / float array or a ``(1, 3, H, W)`` tensor in ``[0, 1]`` (resized
    to the backbone's ``image_size`` by ``encode_image``). Sampling ``prompt`` from
    ``result.noise_latent`` with the same ``steps`` and ``guidance`` reconstructs the image up to
    the inversion error (:func:`reconstruct`).
    """
    x = image_tensor(image).to(backbone.device)
    z0 = backbone.encode_image(x).float()
    return invert_latent(backbone, z0, prompt, steps=steps, guidance=guidance, negative=negative)


def _check_null_text_options(guidance: float, inner_steps: int, lr: float, tolerance: float) -> None:
    checks = (
        ("guidance", guidance, math.isfinite(guidance) and guidance > 1.0,
         "null-text inversion is for guided sampling: use guidance > 1 (e.g. 7.5); guidance 1 needs plain DDIM"),
        ("inner_steps", inner_steps, isinstance(inner_steps, int) and not isinstance(inner_steps, bool)
         and inner_steps >= 1, "use a whole number of optimiser iterations per step, e.g. 10 (the paper's)"),
        ("lr", lr, math.isfinite(lr) and lr > 0, "use a positive learning rate, e.g. 0.01 (the paper's)"),
        ("tolerance", tolerance, math.isfinite(tolerance) and tolerance >= 0,
         "use a non-negative early-stop tolerance, e.g. 1e-5 (the paper's)"),
    )
    for name, value, ok, fix in checks:
        if not ok:
            raise InputError(f"null-text inversion option {name}={value!r} is out of range",
                             where="null_text_invert", fix=fix)


def null_text_invert(
    backbone: Backbone,
    image: np.ndarray | torch.Tensor | None = None,
    prompt: str = "",
    *,
    z0: torch.Tensor | None = None,
    steps: int = 50,
    guidance: float = 7.5,
    inner_steps: int = 10,
    lr: float = 1e-2,
    tolerance: float = 1e-5,
    negative: str = "",
    progress: bool = False,
) -> Inversion:
    """Null-text inversion of ``image`` (or of the latent ``z0``) under ``prompt`` for CFG ``guidance``.

    Per sampling step ``k`` (noisiest first): the conditional prediction at the current latent is
    fixed, and the unconditional embedding ``u_k`` is optimised with Adam (learning rate
    ``lr * (1 - k / (2 steps))``, the paper's 1e-2 -> 5e-3 decay over 50 steps) for at most
    ``inner_steps`` iterations, stopping once the squared error of the guided step against the
    pivot drops below ``tolerance * (1 + 2k)`` (the paper's ``1e-5 + k 2e-5``). The latent then
    moves on with ``u_k``, so errors do not accumulate. Cost: ``steps * (1 + inner_steps)``
    denoiser calls with a backward pass, on batch 1. ``progress`` shows a tqdm bar over the steps.
    """
    from t2ialign.core.sampling import cfg, ddim_step, encode_prompts, step_pairs

    _check_null_text_options(float(guidance), inner_steps, float(lr), float(tolerance))
    if (image is None) == (z0 is None):
        raise InputError("null_text_invert needs exactly one of an image or a latent z0", where="null_text_invert",
                         fix="pass the image (it is encoded with the backbone's VAE) or its latent, not both")
    if z0 is None:
        z0 = backbone.encode_image(image_tensor(image).to(backbone.device)).float()
    pivot = invert_latent(backbone, z0, prompt, steps=steps, guidance=1.0)
    with torch.no_grad():
        cond, uncond = encode_prompts(backbone, [prompt], negative)
    u = uncond.embeds.detach().float().clone()
    z = pivot.noise_latent.clone()
    embeds: list[TextCond] = []
    losses: list[float] = []
    iterations: list[int] = []
    pairs = step_pairs(pivot.timesteps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), desc="null-text inversion", unit="step")
    try:
        for k, (t, t_prev) in enumerate(pairs):
            t_batch = torch.full((1,), float(t), device=z.device)
            target = pivot.latents[k + 1 : k + 2]
            with torch.no_grad():
                pred_cond = backbone.predict(z, t_batch, cond)
            u = u.detach().requires_grad_(True)
            optimiser = torch.optim.Adam([u], lr=float(lr) * (1.0 - k / (2.0 * len(pairs))))
            threshold = float(tolerance) * (1 + 2 * k)
            loss_value, used = float("nan"), 0
            for used in range(1, inner_steps + 1):
                pred_uncond = backbone.predict(z, t_batch, TextCond(u, uncond.pooled, uncond.extra))
                stepped = ddim_step(backbone, z, cfg(pred_cond, pred_uncond, guidance), t, t_prev)
                loss = torch.nn.functional.mse_loss(stepped, target)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise NumericalError(f"the null-text loss is {loss_value} at timestep {t}",
                                         where="null-text inversion",
                                         fix="lower lr, or run the backbone in float32")
                if loss_value < threshold:
                    break
            u = u.detach()
            step_cond = TextCond(u.clone(), uncond.pooled, uncond.extra)
            with torch.no_grad():
                pred_uncond = backbone.predict(z, t_batch, step_cond)
                z = ddim_step(backbone, z, cfg(pred_cond, pred_uncond, guidance), t, t_prev)
            embeds.append(step_cond)
            losses.append(loss_value)
            iterations.append(used)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.2e}", iters=used)
    finally:
        if bar is not None:
            bar.close()
    return Inversion(latents=pivot.latents, timesteps=pivot.timesteps, prompt=prompt, guidance=float(guidance),
                     uncond=embeds, losses=losses, iterations=iterations)


def reconstruct(backbone: Backbone, inversion: Inversion, *, negative: str = "") -> tuple[np.ndarray, torch.Tensor]:
    """Sample the inversion's prompt from its noise latent with the same schedule: ``(image, z0_hat)``.

    For a null-text inversion the per-step unconditional embeddings are used.
    """
    from t2ialign.core.sampling import sample

    per_step = inversion.uncond
    uncond_fn = None if per_step is None else (lambda step, t, z: per_step[step])
    return sample(backbone, inversion.prompt, steps=inversion.steps, guidance=inversion.guidance, seed=0,
                  latents=inversion.noise_latent, negative=negative, uncond_fn=uncond_fn)


__all__: Sequence[str] = ["Inversion", "ddim_invert", "image_tensor", "invert_latent", "null_text_invert", "reconstruct"]
