"""Accuracy of the ELBO engine against exact Gaussian log-likelihoods, vs the number of timesteps.

Uses the analytic backbone of ``tests/helpers/gaussian.py`` (class law ``N(mu_c, s^2 I)``, d = 64,
exact posterior-mean denoiser in the epsilon / v / flow parametrisations; SD1.x VP schedule for
epsilon and v, SD3's shifted flow table for flow). For every number of timesteps T and every
parametrisation it repeats the estimate over ``--repeats`` seeds and reports, for the three
class pairs, the mean |error| and RMSE of the estimated ``log p(x|c_i) - log p(x|c_j)``, the mean
reported ``diff_se``, and how often the exact value lay within 3 reported SEs. The ``uniform``
(reference-code) scheme is reported as the ratio of its difference to the exact one.

    .venv/bin/python benchmarks/elbo_accuracy.py            # prints JSON, writes results/elbo_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch

from t2ialign.core.elbo import estimate_class_losses
from t2ialign.core.timesteps import parse_timesteps
from t2ialign.plugins.weightings import ELBOWeighting, UniformWeighting

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [(0, 1), (0, 2), (1, 2)]


def _load_analytic_module():
    """The analytic backbone the tests validate (``tests/helpers/gaussian.py``; one definition, no copy)."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers import gaussian

    return gaussian


def measure(prediction_type: str, n_timesteps: int, repeats: int, scale: float, analytic) -> dict:
    backbone, x, cond = analytic.gaussian_problem(prediction_type)
    exact = {p: backbone.log_lik_diff(x, *p) for p in PAIRS}
    errors, ses, covered = [], [], 0
    for seed in range(repeats):
        grid = parse_timesteps([["random", 0, 999, n_timesteps]], seed=seed)
        res = estimate_class_losses(backbone, ELBOWeighting(prediction_type, scale=scale), x, cond, grid,
                                    batch_size=512, seed=seed)
        for i, j in PAIRS:
            err = res.log_likelihood_diff(i, j) - exact[(i, j)]
            se = float(res.diff_se[i, j])
            errors.append(err)
            ses.append(se)
            covered += abs(err) < 3 * se
    errs = torch.tensor(errors, dtype=torch.float64)
    return {
        "prediction_type": prediction_type,
        "timesteps": n_timesteps,
        "proposal_scale": scale,
        "mean_abs_error": round(float(errs.abs().mean()), 4),
        "rmse": round(float(errs.pow(2).mean().sqrt()), 4),
        "mean_bias": round(float(errs.mean()), 4),
        "mean_reported_diff_se": round(sum(ses) / len(ses), 4),
        "within_3se": round(covered / len(errors), 4),
        "mean_abs_exact_diff": round(sum(abs(v) for v in exact.values()) / len(exact), 4),
        "truncation_bias": round(max(abs(exact[p] - backbone.truncated_log_lik_diff(x, *p)) for p in PAIRS), 4),
    }


def uniform_ratio(prediction_type: str, analytic) -> float:
    backbone, x, cond = analytic.gaussian_problem(prediction_type)
    res = estimate_class_losses(backbone, UniformWeighting(prediction_type), x, cond,
                                parse_timesteps([[1, 999, 50]]), seed=0)
    return round(res.log_likelihood_diff(0, 2) / backbone.log_lik_diff(x, 0, 2), 5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    parser.add_argument("--repeats", type=int, default=50, help="seeds per cell")
    parser.add_argument("--scales", type=float, nargs="+", default=[2.0, 1.0],
                        help="logistic proposal scales to compare (2 is the default of ELBOWeighting)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "elbo_accuracy.json")
    args = parser.parse_args(argv)

    analytic = _load_analytic_module()
    rows = [measure(p, n, args.repeats, scale, analytic)
            for scale in args.scales
            for p in ("epsilon", "v_prediction", "flow")
            for n in args.timesteps]
    report = {
        "command": "python benchmarks/elbo_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": {"d": math.prod(analytic.LATENT), "s": 0.6, "classes": 3, "pairs": PAIRS,
                  "repeats": args.repeats, "torch": torch.__version__, "python": platform.python_version()},
        "elbo": rows,
        "uniform_diff_over_exact_diff_20_steps": {p: uniform_ratio(p, analytic)
                                                  for p in ("epsilon", "v_prediction", "flow")},
    }
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
