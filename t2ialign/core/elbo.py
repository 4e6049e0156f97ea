"""The ELBO engine: per-class loss estimates of one image, with standard errors.

For one image latent ``z0`` and C class prompts, the engine asks the weighting for a timestep
plan (``t_k``, ``w_k``), draws ONE noise ``eps_k`` per timestep shared by every class (a paired
comparison: the class-independent part of the integrand cancels in differences), runs all
``C x T`` (class, timestep) pairs through ``backbone.predict`` in chunks of ``batch_size`` and
returns ``loss_c = mean_k(w_k * term_ck)``. Lower loss = better explained class. With the
``elbo`` weighting, ``loss_j - loss_i`` estimates ``log p(x|c_i) - log p(x|c_j)``; see
``docs/elbo.md`` for the derivation and the validation against exact Gaussian likelihoods.

Antithetic pairs (``antithetic=True``): every planned timestep is evaluated twice, with
``eps_k`` and ``-eps_k`` (2T sample-forwards per class). The part of a class difference that is
linear in the noise -- the largest fluctuation at high SNR -- then cancels within each pair.

Random numbers: the plan draws first, then the T noises in timestep order, all from one
generator (CPU, seeded with ``seed`` unless a generator is passed); antithetic pairs draw
nothing more, so their first members are exactly the plain estimator's samples. Which pair sees which
timestep and noise never depends on ``batch_size``; only a network whose kernels round
differently per batch shape can change results, at float-rounding level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from t2ialign.core.errors import InputError, NumericalError, PluginError
from t2ialign.core.protocols import Backbone, TextCond, Weighting


@dataclass
class ELBOResult:
    """Per-class loss estimates of one image.

    ``loss`` ``(C,)``: ``mean_k(weight_k * term_ck)``; lower = better explained.
    ``se`` ``(C,)``: standard error of ``loss`` (std over timesteps of the weighted terms / sqrt(T)).
    ``diff_se`` ``(C, C)``: standard error of ``loss_i - loss_j`` from the paired per-timestep
    differences (much smaller than ``se`` because the shared noise cancels the class-free part).
    ``terms`` ``(C, N)``: the weighted per-sample terms. ``t`` ``(N,)``: timesteps used, ``N = T``,
    or ``N = 2T`` with antithetic pairs (each planned timestep twice in a row: ``+eps``, ``-eps``).
    ``loss``, ``se``, ``diff_se`` and ``terms`` are float64 (each term itself is computed in float32).

    The standard errors treat the T terms (with antithetic pairs: the T pair means) as
    independent draws; with stratified plans they are therefore slightly conservative. With
    ``T = 1`` they are ``inf`` (unknown).
    """

    loss: torch.Tensor
    se: torch.Tensor
    diff_se: torch.Tensor
    terms: torch.Tensor
    t: torch.Tensor
    scheme: str
    prediction_type: str
    antithetic: bool = False

    def log_likelihood_diff(self, i: int, j: int) -> float:
        """Estimate of ``log p(x|c_i) - log p(x|c_j)`` = ``loss_j - loss_i``.

        A log-likelihood difference only under the ``elbo`` scheme; under ``uniform`` it is just
        the difference of the reference losses (right sign, wrong scale).
        """
        return float(self.loss[j] - self.loss[i])


def _standard_errors(terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_cls, n_t = terms.shape
    if n_t < 2:
        se = torch.full((n_cls,), math.inf, dtype=terms.dtype)
        diff_se = torch.full((n_cls, n_cls), math.inf, dtype=terms.dtype)
        diff_se.fill_diagonal_(0.0)
        return se, diff_se
    root = math.sqrt(n_t)
    se = terms.std(dim=1) / root
    diff_se = (terms[:, None, :] - terms[None, :, :]).std(dim=2) / root
    return se, diff_se


def estimate_class_losses(
    backbone: Backbone,
    weighting: Weighting,
    z0: torch.Tensor,
    cond: TextCond,
    timesteps: Sequence[int] | torch.Tensor,
    *,
    batch_size: int = 8,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    antithetic: bool = False,
) -> ELBOResult:
    """Estimate the per-class losses of ONE image latent under each row of ``cond``.

    ``z0``: ``(1, C, h, w)`` or ``(C, h, w)`` (or any latent shape with a leading 1).
    ``cond``: one row per class (``backbone.encode_text(class_prompts)``, encoded once).
    ``timesteps``: the parsed grid (:func:`~t2ialign.core.timesteps.parse_timesteps`); the
    weighting decides what it means (the reference grid for ``uniform``, a sample count for ``elbo``).
    ``batch_size``: (class, timestep) pairs per ``predict`` call; bounds memory, never changes results.
    ``seed`` / ``generator``: randomness of the plan and the noises; ``generator`` wins when given,
    ``seed=None`` without a generator draws a fresh random seed.
    ``antithetic``: evaluate each planned timestep with the noise and its negation (2T
    sample-forwards per class, see the module docstring).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}",
                         where="estimate_class_losses", fix="e.g. batch_size=8")
    if not isinstance(antithetic, bool):
        raise InputError(f"antithetic must be true or false, got {antithetic!r}",
                         where="estimate_class_losses", fix="e.g. antithetic=True")
    if z0.dim() == 3:
        latent_shape = tuple(z0.shape)
    elif z0.dim() >= 2 and z0.shape[0] == 1:
        latent_shape = tuple(z0.shape[1:])
    else:
        raise InputError(f"z0 must be ONE latent, (1, C, h, w) or (C, h, w), got shape {tuple(z0.shape)}",
                         where="estimate_class_losses", fix="call the engine once per image")
    n_cls = len(cond)
    if n_cls == 0:
        raise InputError("no classes to score (cond has 0 rows)", where="estimate_class_losses",
                         fix="encode at least one class prompt with backbone.encode_text")

    if generator is None:
        generator = torch.Generator("cpu")
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))

    grid = torch.as_tensor(timesteps).reshape(-1)
    plan = weighting.plan(backbone, grid, generator)
    t_plan = torch.as_tensor(plan.t, dtype=torch.float32).reshape(-1).cpu()
    w_plan = torch.as_tensor(plan.weight).reshape(-1).cpu()
    n_t = t_plan.numel()
    if n_t == 0 or w_plan.numel() != n_t:
        raise PluginError(f"weighting {weighting!r} returned a plan with {n_t} timesteps and "
                          f"{w_plan.numel()} weights", where="ELBO plan",
                          fix="a weighting plan needs one weight per timestep and at least one timestep")
    if not (torch.isfinite(t_plan).all() and torch.isfinite(w_plan).all()):
        raise NumericalError(f"weighting {weighting!r} produced a non-finite timestep or weight",
                             where="ELBO plan", fix="check the backbone's log_snr over its timestep range")

    # all noises first, in timestep order, so chunking cannot change which pair sees which noise
    noises = torch.stack([
        torch.randn(latent_shape, generator=generator, device=generator.device, dtype=torch.float32)
        for _ in range(n_t)
    ]).to(backbone.device)
    n_planned = n_t
    if antithetic:
        # pair members next to each other: (t_0, +eps_0), (t_0, -eps_0), (t_1, +eps_1), ...
        t_plan = t_plan.repeat_interleave(2)
        w_plan = w_plan.repeat_interleave(2)
        noises = torch.stack([noises, -noises], dim=1).reshape((2 * n_t,) + latent_shape)
        n_t = 2 * n_t
    z0_one = z0.reshape((1,) + latent_shape).to(backbone.device)

    # pair p = (class p // T, timestep p % T). Terms stay on the backbone's device and are checked
    # once at the end: a .cpu() or a finiteness check per batch synchronises a GPU stream every
    # forward (benchmarks/gpu.py)
    n_pairs = n_cls * n_t
    raw_dev: torch.Tensor | None = None  # made at the first batch, in the terms' own dtype
    t_dev = t_plan.to(backbone.device)
    pair_ids = torch.arange(n_pairs, device=backbone.device)
    pred_ok: list[torch.Tensor] = []
    term_ok: list[torch.Tensor] = []
    bshape = (-1,) + (1,) * len(latent_shape)
    for start in range(0, n_pairs, batch_size):
        pairs = pair_ids[start:start + batch_size]
        cls_idx, t_idx = pairs // n_t, pairs % n_t
        t = t_dev[t_idx]
        noise = noises[t_idx]
        z0_b = z0_one.expand((pairs.numel(),) + latent_shape)
        z_t = backbone.add_noise(z0_b, t, noise.to(z0_b.dtype))
        with torch.no_grad():
            pred = backbone.predict(z_t, t, cond.select(cls_idx))
        pred = pred.float()
        pred_ok.append(torch.isfinite(pred).all())
        alpha, sigma = backbone.alpha_sigma(t)
        term = weighting.term(
            pred,
            z0=z0_b.float(),
            noise=noise.float(),
            z_t=z_t.float(),
            alpha=torch.as_tensor(alpha, dtype=torch.float32, device=pred.device).reshape(bshape),
            sigma=torch.as_tensor(sigma, dtype=torch.float32, device=pred.device).reshape(bshape),
        )
        term_ok.append(torch.isfinite(term).all())
        if raw_dev is None:
            raw_dev = torch.empty(n_pairs, dtype=term.dtype, device=term.device)
        raw_dev[start:start + pairs.numel()] = term.detach().reshape(-1).to(raw_dev.device)

    bad = (~torch.stack(pred_ok)).cpu()
    if bad.any():
        first = int(bad.nonzero()[0, 0]) * batch_size
        ts = t_plan[torch.arange(first, min(first + batch_size, n_pairs)) % n_t]
        raise NumericalError(
            f"backbone '{backbone.name}' predicted NaN/Inf at timesteps {sorted(set(ts.tolist()))}",
            where="ELBO engine, denoiser prediction",
            fix="run the denoiser in float32 (dtype: float32) or check the model weights")
    if not bool(torch.stack(term_ok).all()):
        raise NumericalError(f"weighting {weighting!r} produced NaN/Inf terms",
                             where="ELBO engine, loss terms",
                             fix="check the backbone's alpha_sigma at these timesteps")
    raw = raw_dev.cpu().double()

    # weights can reach ~1e4 where the proposal is thin; weighting, mean and std of paired
    # differences are done in float64 so that the class-free part cancels cleanly
    terms = raw.reshape(n_cls, n_t) * w_plan.double()[None, :]
    # the two members of an antithetic pair are not independent: the pair means are the draws
    draws = terms.reshape(n_cls, n_planned, 2).mean(dim=2) if antithetic else terms
    se, diff_se = _standard_errors(draws)
    return ELBOResult(
        loss=terms.mean(dim=1),
        se=se,
        diff_se=diff_se,
        terms=terms,
        t=t_plan,
        scheme=str(getattr(weighting, "scheme", "?")),
        prediction_type=str(getattr(weighting, "prediction_type", getattr(backbone, "prediction_type", "?"))),
        antithetic=antithetic,
    )
