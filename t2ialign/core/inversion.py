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
reconstruction drifts (the problem Null-text inversion solves by optimisation, not done here).
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """

    latents: torch.Tensor
    timesteps: list[int]
    prompt: str
    guidance: float

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


def reconstruct(backbone: Backbone, inversion: Inversion, *, negative: str = "") -> tuple[np.ndarray, torch.Tensor]:
    """Sample the inversion's prompt from its noise latent with the same schedule: ``(image, z0_hat)``."""
    from t2ialign.core.sampling import sample

    return sample(backbone, inversion.prompt, steps=inversion.steps, guidance=inversion.guidance, seed=0,
                  latents=inversion.noise_latent, negative=negative)


__all__: Sequence[str] = ["Inversion", "ddim_invert", "image_tensor", "invert_latent", "reconstruct"]
