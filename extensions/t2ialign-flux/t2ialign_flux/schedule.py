"""The noise level of a timestep index for flow-matching models with a static or dynamic shift.

diffusers' ``FlowMatchEulerDiscreteScheduler`` maps a raw noise fraction ``s`` in ``(0, 1]`` to the
noise level ``sigma`` the model was trained on. With a static ``shift`` (SD3)::

    sigma = shift * s / (1 + (shift - 1) * s)

With ``use_dynamic_shifting`` (FLUX.1) the shift depends on the image: the pipeline computes ``mu``
from the packed image sequence length ``n`` by the straight line through ``(base_image_seq_len,
base_shift)`` and ``(max_image_seq_len, max_shift)`` and the scheduler applies

    exponential: sigma = e^mu / (e^mu + (1/s - 1))        linear: sigma = mu / (mu + (1/s - 1))

which is the static formula with ``shift = e^mu`` (resp. ``mu``). So for one working resolution a
dynamic-shift model is a static-shift model whose shift is fixed by ``n``, and the t2ialign
conventions apply unchanged: ``t`` in ``[0, N - 1]``, ``s = (t + 1) / N``, ``alpha = 1 - sigma``.
For integer ``t`` this is ``scheduler.set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu)``'s table
flipped to increasing noise (checked by the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from t2ialign.core.errors import ConfigError, InputError

#: scheduler options that bend the table in ways this schedule does not model
_UNSUPPORTED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "invert_sigmas", "stochastic_sampling")


def dynamic_shift_mu(image_seq_len: int, config: Mapping[str, Any]) -> float:
    """``mu`` of the scheduler config for ``image_seq_len`` packed image tokens (what FluxPipeline passes).

    The line through ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``,
    with the same defaults the pipeline uses for keys the config lacks.
    """
    base_len = float(config.get("base_image_seq_len", 256))
    max_len = float(config.get("max_image_seq_len", 4096))
    base_shift = float(config.get("base_shift", 0.5))
    max_shift = float(config.get("max_shift", 1.15))
    if max_len == base_len:
        raise ConfigError("scheduler config has max_image_seq_len == base_image_seq_len: no line for mu",
                          where="scheduler/scheduler_config.json",
                          fix="use a scheduler config written by diffusers for a dynamic-shift model")
    slope = (max_shift - base_shift) / (max_len - base_len)
    return base_shift + slope * (float(image_seq_len) - base_len)


@dataclass(frozen=True)
class FlowShiftSchedule:
    """``sigma(t)`` of a flow-matching model with an effective ``shift`` (already resolved from ``mu``).

    ``mu`` is ``None`` for static-shift schedulers and records the dynamic shift otherwise.
    """

    shift: float
    num_train_timesteps: int = 1000
    mu: float | None = None

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any], image_seq_len: int, *,
                              where: str = "scheduler config") -> "FlowShiftSchedule":
        """The schedule a ``FlowMatchEulerDiscreteScheduler`` config gives images of ``image_seq_len`` tokens."""
        bad = [k for k in _UNSUPPORTED if config.get(k)]
        if bad:
            raise ConfigError(
                f"scheduler options {bad} are set; they change the noise table in ways this backbone does not model",
                where=where,
                fix="use the checkpoint's original scheduler config (FLUX.1 sets none of them)",
            )
        n = int(config.get("num_train_timesteps", 1000))
        if not config.get("use_dynamic_shifting"):
            return cls(shift=float(config.get("shift", 1.0)), num_train_timesteps=n)
        mu = dynamic_shift_mu(image_seq_len, config)
        kind = config.get("time_shift_type", "exponential")
        if kind == "exponential":
            shift = math.exp(mu)
        elif kind == "linear":
            shift = mu
        else:
            raise ConfigError(f"unknown time_shift_type {kind!r}", where=where, fix="use exponential or linear")
        if not shift > 0:
            raise ConfigError(f"dynamic shift gives a non-positive shift ({shift:g}) at {image_seq_len} image tokens",
                              where=where, fix="use another image_size")
        return cls(shift=shift, num_train_timesteps=n, mu=mu)

    def sigma(self, t: torch.Tensor | float, *, where: str = "flow schedule") -> torch.Tensor:
        """Noise level of float timestep indices, float64 (so the table matches diffusers to float32 rounding)."""
        t = torch.as_tensor(t)
        if t.dtype.is_complex or t.dtype == torch.bool:
            raise InputError(f"timesteps must be real numbers, got dtype {t.dtype}", where=where)
        t64 = t.to(torch.float64)
        top = float(self.num_train_timesteps - 1)
        if t64.numel() and (not torch.isfinite(t64).all() or t64.min() < 0 or t64.max() > top):
            raise InputError(
                f"timestep index out of range: got values in [{t64.min().item():g}, {t64.max().item():g}]",
                where=where,
                fix=f"timestep indices run from 0 to {self.num_train_timesteps - 1} (index into the flipped "
                "flow-matching sigma table)",
            )
        s = (t64 + 1.0) / self.num_train_timesteps
        return self.shift * s / (1.0 + (self.shift - 1.0) * s)

    def alpha_sigma(self, t: torch.Tensor, *, where: str = "flow schedule") -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 - sigma, sigma)`` as float32 on ``t``'s device."""
        sigma = self.sigma(t, where=where)
        device = torch.as_tensor(t).device
        return (1.0 - sigma).to(device, torch.float32), sigma.to(device, torch.float32)

    def log_snr(self, t: torch.Tensor, *, where: str = "flow schedule") -> torch.Tensor:
        """``2 log((1 - sigma) / sigma)``; ``-inf`` at the last index, where sigma is exactly 1."""
        sigma = self.sigma(t, where=where)
        return (2.0 * torch.log((1.0 - sigma) / sigma)).to(torch.as_tensor(t).device, torch.float32)
