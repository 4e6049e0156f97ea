"""Deterministic sampling through the Backbone protocol: DDIM for DDPM models, Euler for flow models.

Generation and editing need to *draw* images, not only score them. Rather than wrapping each
diffusers pipeline (whose ``__call__`` we could not hook per step without copying it), the
sampler is written once against :class:`~t2ialign.core.protocols.Backbone`: the backbone says
how noisy a timestep is (``alpha_sigma``) and what its denoiser predicts (``predict``); this
module turns that into a trajectory. Nothing here knows a model family.

Schedule (method-spec §9, the reference generation script): 50 steps visit the "trailing"
timesteps ``t = 999, 979, ..., 19`` and each step moves to the next visited timestep, the last
one to ``t = 0`` -- so the final latent sits at ``alpha_bar_0`` (not at a noise-free 1), exactly
like diffusers' ``DDIMScheduler(set_alpha_to_one=False, timestep_spacing="trailing")``.

Update rule for a step ``t -> t_prev`` with guided prediction ``pred`` at ``z_t``:

* ``epsilon`` / ``v_prediction``: deterministic DDIM (eta = 0). The prediction is turned into
  ``eps`` by the one conversion helper of the toolkit
  (:func:`t2ialign.core.prediction.eps_from_prediction`), ``x0 = (z_t - sigma_t eps) / alpha_t``,
  and ``z_prev = alpha_prev x0 + sigma_prev eps``.
* ``flow`` (rectified flow, ``v = eps - x0``): the Euler step ``z_prev = z_t + (sigma_prev - sigma_t) v``.
  (Algebraically the same trajectory as DDIM in ``(x0, eps)`` form, but it needs no division by
  ``alpha_t``, which is 0 at the first flow timestep.)

Classifier-free guidance is applied to the *native* prediction. Every conversion above is affine
in the prediction with coefficients that depend only on ``z_t`` and ``t``, so guiding native
predictions equals guiding the epsilons.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from t2ialign.core.errors import ConfigError, InputError
from t2ialign.core.prediction import eps_from_prediction
from t2ialign.core.protocols import Backbone, TextCond

#: ``cond_fn(step, t, z_t) -> TextCond``: the conditional embedding to use at this step
CondFn = Callable[[int, int, torch.Tensor], TextCond]
#: ``step_callback(step, t, z_prev)``: sees the latents after each step; may return replacements
StepCallback = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]


def encode_prompts(backbone: Backbone, prompts: str | Sequence[str], negative: str = "") -> tuple[TextCond, TextCond]:
    """``(cond, uncond)`` for classifier-free guidance, both from ``backbone.encode_text``.

    ``uncond`` is the encoding of ``negative`` (the empty prompt by default, as in the reference),
    repeated once per prompt.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("encode_prompts needs a prompt or a non-empty list of prompts",
                         where=f"backbone {getattr(backbone, 'name', '?')}",
                         fix="pass e.g. 'a red cube and a blue sphere'")
    cond = backbone.encode_text(prompts)
    uncond = backbone.encode_text([negative]).select([0] * len(prompts))
    return cond, uncond


def ddim_timesteps(backbone: Backbone, steps: int) -> list[int]:
    """The ``steps`` "trailing" timesteps from the top of the schedule down, e.g. 999, 979, ..., 19.

    ``t_k = round(N - k * N / steps) - 1`` for ``k = 0..steps-1`` with ``N = num_train_timesteps``:
    the first step always starts from the noisiest index and the spacing is even.
    """
    n = int(backbone.num_train_timesteps)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= n:
        raise ConfigError(f"number of sampling steps must be an integer in [1, {n}], got {steps!r}",
                          where="sampling steps", fix="use e.g. steps=50 (the reference) or fewer for previews")
    grid = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
    return [int(t) for t in grid[:steps]]


def step_pairs(timesteps: Sequence[int]) -> list[tuple[int, int]]:
    """``(t, t_prev)`` of every step: each visited timestep moves to the next one, the last to 0."""
    ts = [int(t) for t in timesteps]
    return [(t, ts[i + 1] if i + 1 < len(ts) else 0) for i, t in enumerate(ts)]


def cfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)`` (scale 1 = conditional only)."""
    return eps_uncond + float(scale) * (eps_cond - eps_uncond)


def _schedule(backbone: Backbone, t: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha, sigma = backbone.alpha_sigma(torch.tensor([float(t)]))
    return (alpha.to(like.device, torch.float32).reshape(()), sigma.to(like.device, torch.float32).reshape(()))


def ddim_step(backbone: Backbone, z_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
    """One deterministic step from ``z_t`` at timestep ``t`` to timestep ``t_prev``.

    ``eps`` is the (guided) *native* prediction of the backbone at ``z_t``: the noise for
    ``epsilon`` models, ``v`` for ``v_prediction`` and ``flow`` models (see module docstring).
    Computed in float32; returns a float32 tensor shaped like ``z_t``.
    """
    z = z_t.float()
    pred = eps.float().to(z.device)
    alpha_t, sigma_t = _schedule(backbone, t, z)
    alpha_p, sigma_p = _schedule(backbone, t_prev, z)
    if backbone.prediction_type == "flow":
        return z + (sigma_p - sigma_t) * pred
    noise = eps_from_prediction(backbone.prediction_type, pred, z, alpha_t, sigma_t)
    if float(alpha_t) <= 0.0:
        raise InputError(f"alpha is 0 at timestep {t}: the clean image cannot be estimated",
                         where=f"backbone {backbone.name}",
                         fix="sample from a timestep below the end of the noise schedule")
    x0 = (z - sigma_t * noise) / alpha_t
    return alpha_p * x0 + sigma_p * noise


def _rows(cond: TextCond, batch: int) -> TextCond:
    """``cond`` with ``batch`` rows: a single row is repeated, a full batch passes as it is."""
    if len(cond) == batch:
        return cond
    if len(cond) != 1:
        raise InputError(f"a per-step condition has {len(cond)} rows for a batch of {batch}",
                         where="sampling", fix="return one row (shared by the batch) or one per prompt")
    return cond.select([0] * batch)


def latent_shape_of(backbone: Backbone, batch: int = 1) -> tuple[int, ...]:
    """``(batch, C, h, w)`` of the backbone's latents at its native ``image_size``."""
    config = getattr(backbone.denoiser, "config", None)
    channels = getattr(config, "in_channels", None)
    side = getattr(backbone, "latent_size", None)
    if side is None and getattr(backbone, "vae_scale_factor", None):
        side = backbone.image_size // backbone.vae_scale_factor
    if channels is None or side is None:
        raise InputError(f"cannot infer the latent shape of backbone '{backbone.name}'",
                         where="sampling", fix="pass latent_shape=(1, C, h, w) to sample()")
    return (batch, int(channels), int(side), int(side))


def initial_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard-normal latents from a CPU generator seeded with ``seed`` (device-independent)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` floats in ``[0, 1]`` -> ``(B, H, W, 3)`` uint8."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample(
    backbone: Backbone,
    prompt: str | Sequence[str],
    *,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int,
    latent_shape: Sequence[int] | None = None,
    step_callback: StepCallback | None = None,
    cond_fn: CondFn | None = None,
    uncond_fn: CondFn | None = None,
    negative: str = "",
    latents: torch.Tensor | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """Draw an image for ``prompt`` with ``steps`` deterministic steps and CFG ``guidance``.

    Returns ``(image, latents)``: ``image`` is ``H x W x 3`` uint8 for a single prompt string
    and ``B x H x W x 3`` for a list (all prompts start from the *same* noise, which is what
    paired comparisons and Prompt-to-Prompt need); ``latents`` are the final latents ``(B, C, h, w)``.

    ``seed`` seeds a CPU generator for the initial noise (one draw shared by the batch), so a
    seed gives the same picture on every device. ``latents`` replaces that noise (e.g. an
    inverted latent). ``cond_fn(step, t, z_t)`` may return the conditional ``TextCond`` to use
    at a step instead of the prompt's own encoding; ``step_callback(step, t, z_prev)`` sees the
    latents after each step and may return a tensor that replaces them. ``uncond_fn(step, t, z_t)``
    likewise replaces the unconditional embedding of a step (one row, shared by the batch): this
    is how the per-step embeddings of null-text inversion (:func:`t2ialign.core.inversion.null_text_invert`)
    are sampled with.
    """
    decode = getattr(backbone, "decode_latents", None)
    if decode is None:
        raise InputError(f"backbone '{backbone.name}' cannot decode latents to images",
                         where=f"{type(backbone).__name__}",
                         fix="use a backbone plugin that implements decode_latents(z) (SD 1.x/2.x, SDXL, toy)")
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    cond, uncond = encode_prompts(backbone, prompts, negative)
    batch = len(prompts)
    if latents is None:
        shape = tuple(latent_shape) if latent_shape is not None else latent_shape_of(backbone, 1)
        noise = initial_noise((1, *shape[1:]), seed)
        z = noise.expand(batch, *shape[1:]).clone()
    else:
        z = latents.detach().float().cpu().clone()
        if z.shape[0] == 1 and batch > 1:
            z = z.expand(batch, *z.shape[1:]).clone()
    z = z.to(backbone.device)
    guided = float(guidance) != 1.0
    for step, (t, t_prev) in enumerate(step_pairs(ddim_timesteps(backbone, steps))):
        c = cond_fn(step, t, z) if cond_fn is not None else cond
        u = uncond if uncond_fn is None else _rows(uncond_fn(step, t, z), batch)
        t_batch = torch.full((batch * (2 if guided else 1),), float(t), device=backbone.device)
        if guided:  # one denoiser call for both branches
            both = backbone.predict(torch.cat([z, z]), t_batch, TextCond.cat([u, c]))
            pred = cfg(both[batch:], both[:batch], guidance)
        else:
            pred = backbone.predict(z, t_batch, c)
        z = ddim_step(backbone, z, pred, t, t_prev)
        if step_callback is not None:
            replaced = step_callback(step, t, z)
            if replaced is not None:
                z = replaced.float().to(z.device)
    images = to_uint8(decode(z))
    return (images[0] if single else images), z


__all__ = [
    "CondFn",
    "StepCallback",
    "cfg",
    "ddim_step",
    "ddim_timesteps",
    "encode_prompts",
    "initial_noise",
    "latent_shape_of",
    "sample",
    "step_pairs",
    "to_uint8",
]
