"""Fidelity of cheap ELBO estimators vs the number of sample-forwards (issue 16, the fast preset).

On a CPU, batching classes x timesteps adds no throughput, so the only way to make the ELBO pass
cheaper is to evaluate fewer (class, timestep) samples. This study measures how much fidelity
each estimator keeps as the number ``N`` of denoiser sample-forwards per class falls:

* ``uniform/grid``: the reference code's estimator, an evenly spaced grid ``1, 1 + s, ...``
  (``s = 1000 // N``); at ``N = 20`` it IS the reference (``[[1, 999, 50]]``);
* ``uniform/stratified``: one timestep drawn in each of ``N`` equal slices of ``[1, 999]``
  (``["stratified", 1, 999, N]``);
* ``uniform/stratified+anti``: ``N / 2`` stratified timesteps, each with the noise and its negation;
* ``elbo``: the importance-sampled continuous-time ELBO (its plan is always stratified);
* ``elbo+anti``: ``N / 2`` planned ELBO timesteps with antithetic noise pairs.

Every estimator shares one noise per timestep across the classes (the engine always does). Its
target is a high-precision estimate of the SAME scheme: 200 stratified samples (``uniform``) or
200 ELBO samples (``elbo``), drawn with noise independent of every estimator's. Per image with
``K >= 2`` classes the study records all estimators' per-class losses; the fidelity measures are

* ``pair_agreement``: fraction of class pairs ordered like the target (per image, higher = better);
* ``top1``: the lowest-loss class is the target's (per image, higher = better);
* ``score_error``: mean ``|S - S_target|`` of the calibration scores ``S = gamma ** minmax(L)``,
  ``gamma = 1/3``, what the calibration actually uses (per image, lower = better);
* ``diff_corr``: Pearson correlation of all pairwise differences ``L_i - L_j`` with the target's
  (over all images' pairs, higher = better).

Each is compared with the reference (``uniform/grid`` at ``N = 20``) by a paired bootstrap over
images (95% CI of candidate - reference). Per candidate the summary says whether it is
``not_significantly_worse`` (no measure's CI lies wholly on the worse side) and whether it is
``not_worse_point`` (every point difference is on the not-worse side). The preset rule
(``preset_choice`` per backbone, ``preset_decision`` over both in the toy summary): the smallest
``N`` that is not significantly worse on any measure (on every backbone); ties: the most
measures not worse in point, then the lower score error.

Two backbones:

* ``analytic``: the Gaussian backbone of ``tests/helpers/gaussian.py`` (exact posterior-mean
  denoiser, SD1.x schedule, epsilon prediction, d = 64, 3 classes, class spread drawn
  log-uniformly in [0.03, 0.35] so that near-ties occur); the ``elbo`` scheme is also scored
  against its exact value (the truncated log-likelihood difference). Cheap: run fully.
* ``toy``: the project's toy model on ``--images`` images of toy_shapes (val and test
  interleaved 2:3, so a partial run is stratified), with the candidates at ``N <= 6`` and the
  antithetic ones at ``N = 10`` (``TOY_SET``). Expensive (494 sample-forwards per class per
  image, 400 of them for the two targets): resumable, one JSON line per image under
  ``--records``, several shards can run side by side (``--shard 0/2``, ``--shard 1/2``), and ``--summarize`` writes the summary atomically.

    python benchmarks/elbo_fidelity.py analytic                 # ~1 min, results/elbo_fidelity_analytic.json
    nice -n 15 python benchmarks/elbo_fidelity.py toy --shard 0/2 &  # records only
    nice -n 15 python benchmarks/elbo_fidelity.py toy --shard 1/2 &
    python benchmarks/elbo_fidelity.py toy --summarize          # results/elbo_fidelity_toy.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, command_line, machine, write_result  # noqa: E402

from t2ialign.core.calibration import alignment_scores  # noqa: E402
from t2ialign.core.elbo import estimate_class_losses  # noqa: E402
from t2ialign.core.fileio import append_jsonl, read_jsonl, repair_jsonl  # noqa: E402
from t2ialign.core.pipeline import derive_seed, image_to_tensor  # noqa: E402
from t2ialign.core.timesteps import parse_timesteps  # noqa: E402
from t2ialign.plugins.weightings import ELBOWeighting, UniformWeighting  # noqa: E402

REFERENCE = "uniform/grid@20"
TARGET_N = 200
GAMMA = 1.0 / 3.0
#: sample-forwards per class of the candidate estimators
N_PLAIN = (2, 4, 6, 10, 20)
N_ANTI = (2, 4, 6, 10)
#: measure -> +1 if higher is better, -1 if lower is better
MEASURES = {"pair_agreement": 1, "top1": 1, "score_error": -1, "diff_corr": 1}


@dataclass(frozen=True)
class Estimator:
    """One cheap estimator: scheme, timestep spec and whether noises come in antithetic pairs."""

    name: str
    scheme: str
    spec: tuple
    antithetic: bool
    forwards: int  # sample-forwards per class


def grid_spec(n: int) -> list[list[int]]:
    """The reference-style evenly spaced grid with ``n`` timesteps (``[[1, 999, 50]]`` at 20)."""
    stride = 1000 // n
    return [[1, 1 + stride * (n - 1) + 1, stride]]


#: the cheaper set run on the toy model (its 200-sample targets dominate the cost anyway):
#: the reference, every candidate at N <= 6 and the antithetic ones at N = 10
TOY_SET = ("uniform/grid@20", "uniform/grid@4", "uniform/grid@6", "uniform/stratified@4", "uniform/stratified@6",
           "elbo@4", "elbo@6", *(f"{f}@{n}" for f in ("uniform/stratified+anti", "elbo+anti") for n in N_ANTI))


def estimators(names: Sequence[str] | None = None) -> list[Estimator]:
    """All candidate estimators (or those named, in the canonical order)."""
    out = []
    for n in N_PLAIN:
        out.append(Estimator(f"uniform/grid@{n}", "uniform", tuple(map(tuple, grid_spec(n))), False, n))
        out.append(Estimator(f"uniform/stratified@{n}", "uniform", (("stratified", 1, 999, n),), False, n))
        out.append(Estimator(f"elbo@{n}", "elbo", (("stratified", 1, 999, n),), False, n))
    for n in N_ANTI:
        out.append(Estimator(f"uniform/stratified+anti@{n}", "uniform", (("stratified", 1, 999, n // 2),), True, n))
        out.append(Estimator(f"elbo+anti@{n}", "elbo", (("stratified", 1, 999, n // 2),), True, n))
    return out if names is None else [e for e in out if e.name in names]


TARGETS = {
    "uniform": Estimator("uniform/target", "uniform", (("stratified", 1, 999, TARGET_N),), False, TARGET_N),
    "elbo": Estimator("elbo/target", "elbo", (("stratified", 1, 999, TARGET_N),), False, TARGET_N),
}


def run_estimators(backbone: Any, z0: torch.Tensor, cond: Any, key: str, batch_size: int,
                   names: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Both targets' and the estimators' per-class losses of one image, each with its own seed."""
    weightings = {"uniform": UniformWeighting(backbone.prediction_type),
                  "elbo": ELBOWeighting(backbone.prediction_type)}
    out = {}
    for est in [*TARGETS.values(), *estimators(names)]:
        seed = derive_seed(16, f"{key}:{est.name}")
        ts = parse_timesteps([list(e) for e in est.spec], seed=seed % (2 ** 31))
        res = estimate_class_losses(backbone, weightings[est.scheme], z0, cond, ts, batch_size=batch_size,
                                    seed=seed, antithetic=est.antithetic)
        assert res.t.numel() == est.forwards, (est.name, res.t.numel())
        out[est.name] = res.loss.tolist()
    return out


# --------------------------------------------------------------------------------------------
# measures
# --------------------------------------------------------------------------------------------
def _pair_diffs(loss: np.ndarray) -> np.ndarray:
    i, j = np.triu_indices(len(loss), k=1)
    return loss[i] - loss[j]


def image_measures(est: list[float], target: list[float]) -> dict[str, float]:
    e, t = np.asarray(est, dtype=np.float64), np.asarray(target, dtype=np.float64)
    de, dt = _pair_diffs(e), _pair_diffs(t)
    s_e = alignment_scores(torch.as_tensor(e), GAMMA).numpy()
    s_t = alignment_scores(torch.as_tensor(t), GAMMA).numpy()
    return {"pair_agreement": float(np.mean(np.sign(de) == np.sign(dt))),
            "top1": float(np.argmin(e) == np.argmin(t)),
            "score_error": float(np.mean(np.abs(s_e - s_t)))}


def _corr_sums(records: list[dict[str, Any]], name: str, target: str) -> np.ndarray:
    """Per image ``(n, sx, sy, sxx, syy, sxy)`` of the pair differences, for a bootstrap of Pearson r."""
    rows = []
    for r in records:
        x = _pair_diffs(np.asarray(r["losses"][name])); y = _pair_diffs(np.asarray(r["losses"][target]))
        rows.append([len(x), x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()])
    return np.asarray(rows, dtype=np.float64)


def _pearson(sums: np.ndarray) -> np.ndarray:
    """Pearson r from summed moments; ``sums`` ``(..., 6)``."""
    n, sx, sy, sxx, syy, sxy = np.moveaxis(sums, -1, 0)
    cov = sxy - sx * sy / n
    return cov / np.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n))


def summarize(records: list[dict[str, Any]], *, boots: int = 2000, seed: int = 0,
              exact_key: str | None = None) -> dict[str, Any]:
    """Measures per estimator, paired bootstrap CIs vs the reference, the preset choice."""
    present = set(records[0]["losses"]) if records else set()
    names = [e.name for e in estimators(present)]
    by_name = {e.name: e for e in estimators(present)}
    n_img = len(records)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_img, size=(boots, n_img))

    def per_image(name: str, target: str) -> dict[str, np.ndarray]:
        rows = [image_measures(r["losses"][name], r["losses"][target]) for r in records]
        out = {m: np.asarray([row[m] for row in rows]) for m in ("pair_agreement", "top1", "score_error")}
        return out

    def table(target_of) -> dict[str, Any]:
        vals, corr_boot = {}, {}
        for name in names + [REFERENCE]:
            tgt = target_of(by_name[name].scheme)
            vals[name] = per_image(name, tgt)
            sums = _corr_sums(records, name, tgt)
            vals[name]["diff_corr_point"] = float(_pearson(sums.sum(0)))
            corr_boot[name] = _pearson(sums[idx].sum(1))
        ref = vals[REFERENCE]
        rows = {}
        for name in names:
            est, v = by_name[name], vals[name]
            row: dict[str, Any] = {"scheme": est.scheme, "forwards_per_class": est.forwards,
                                   "antithetic": est.antithetic, "spec": [list(e) for e in est.spec]}
            point_ok, ci_ok = True, True
            for m, sign in MEASURES.items():
                if m == "diff_corr":
                    point = v["diff_corr_point"]
                    diff = point - ref["diff_corr_point"]
                    boot = corr_boot[name] - corr_boot[REFERENCE]
                else:
                    point = float(v[m].mean())
                    d = v[m] - ref[m]
                    diff = float(d.mean())
                    boot = d[idx].mean(1)
                lo, hi = np.quantile(boot, [0.025, 0.975])
                row[m] = round(point, 4)
                row[f"{m}_vs_reference"] = {"diff": round(diff, 4), "ci95": [round(float(lo), 4), round(float(hi), 4)]}
                worse = bool(sign * (hi if sign > 0 else lo) < 0)  # the whole CI on the worse side
                row[f"{m}_vs_reference"]["significantly_worse"] = worse
                point_ok &= bool(sign * diff >= 0)
                ci_ok &= not worse
            row["not_worse_point"] = point_ok           # every point difference on the not-worse side
            row["not_significantly_worse"] = ci_ok      # no 95% CI wholly on the worse side
            rows[name] = row
        ref_row = {m: round(float(ref[m].mean()), 4) for m in ("pair_agreement", "top1", "score_error")}
        ref_row["diff_corr"] = round(ref["diff_corr_point"], 4)
        return {"reference": ref_row, "estimators": rows}

    own = table(lambda scheme: TARGETS[scheme].name)
    cheaper = {n: r for n, r in own["estimators"].items() if r["forwards_per_class"] < 20}
    choice = _choose(cheaper)
    out = {"images": n_img, "pairs": int(sum(len(r["losses"][REFERENCE]) * (len(r["losses"][REFERENCE]) - 1) // 2
                                             for r in records)),
           "bootstrap": boots, "reference": REFERENCE, "target_samples": TARGET_N,
           "vs_own_scheme_target": own,
           "preset_choice": None if choice is None else {
               "estimator": choice,
               **{k: own["estimators"][choice][k] for k in ("scheme", "forwards_per_class", "antithetic", "spec")}},
           "candidates_not_worse": sorted(n for n, r in cheaper.items()
                                          if r["not_worse_point"] and r["not_significantly_worse"]),
           "candidates_not_significantly_worse": sorted(n for n, r in cheaper.items() if r["not_significantly_worse"])}
    # how much the two schemes agree at all: their 200-sample estimates, and each estimator vs
    # the OTHER scheme's target
    out["targets_pair_agreement"] = round(float(np.mean([
        image_measures(r["losses"][TARGETS["uniform"].name], r["losses"][TARGETS["elbo"].name])["pair_agreement"]
        for r in records])), 4)
    out["vs_other_scheme_target_pair_agreement"] = {
        name: round(float(per_image(name, TARGETS["elbo" if by_name[name].scheme == "uniform" else "uniform"].name)
                          ["pair_agreement"].mean()), 4) for name in names}
    if exact_key:
        out["vs_exact"] = table(lambda scheme: exact_key if scheme == "elbo" else TARGETS[scheme].name)
        out["vs_exact"]["note"] = ("elbo estimators vs the exact truncated log-likelihood; uniform ones vs their "
                                   "200-sample target as above; the reference row is vs its own target")
    return out


def _points_not_worse(row: dict[str, Any]) -> int:
    return sum(MEASURES[m] * row[f"{m}_vs_reference"]["diff"] >= 0 for m in MEASURES)


def _choose(rows: dict[str, dict[str, Any]]) -> str | None:
    """The preset rule: the smallest N that is not significantly worse on any measure; ties: the
    most measures not worse in point, then the lower score error."""
    ok = [(r["forwards_per_class"], -_points_not_worse(r), r["score_error"], n) for n, r in rows.items()
          if r["not_significantly_worse"]]
    return min(ok)[3] if ok else None


def decide(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The preset rule applied to several backbones at once: a candidate must pass on each."""
    tables = {b: r["vs_own_scheme_target"]["estimators"] for b, r in reports.items()}
    common = set.intersection(*(set(t) for t in tables.values()))
    rows = {}
    for n in common:
        rs = [t[n] for t in tables.values()]
        if rs[0]["forwards_per_class"] >= 20:
            continue
        rows[n] = {"forwards_per_class": rs[0]["forwards_per_class"],
                   "not_significantly_worse": all(r["not_significantly_worse"] for r in rs),
                   "score_error": max(r["score_error"] for r in rs),
                   **{f"{m}_vs_reference": {"diff": min(MEASURES[m] * r[f"{m}_vs_reference"]["diff"] for r in rs)
                                            * MEASURES[m]} for m in MEASURES}}
    choice = _choose(rows)
    return {"backbones": sorted(reports), "choice": choice,
            "rule": "smallest sample-forwards per class whose paired 95% CI vs the reference lies wholly on the "
                    "worse side for no measure, on every backbone; ties: most measures not worse in point, then "
                    "lower score error",
            "passing_on_all": sorted(n for n, r in rows.items() if r["not_significantly_worse"]),
            "points_not_worse_per_backbone": None if choice is None else {
                b: {m: tables[b][choice][f"{m}_vs_reference"] for m in MEASURES} for b in tables}}


# --------------------------------------------------------------------------------------------
# analytic Gaussian backbone
# --------------------------------------------------------------------------------------------
def run_analytic(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tests.helpers.gaussian import LATENT, GaussianBackbone

    d = math.prod(LATENT)
    records = []
    tic = time.perf_counter()
    for p in range(args.problems):
        gen = torch.Generator().manual_seed(1000 + p)
        spread = 0.35 * math.exp(math.log(0.03 / 0.35) * float(torch.rand((), generator=gen)))
        means = spread * torch.randn(3, d, generator=gen, dtype=torch.float64)
        backbone = GaussianBackbone("epsilon", means, 0.6)
        cls = int(torch.randint(0, 3, (), generator=gen))
        x = (means[cls] + 0.6 * torch.randn(d, generator=gen, dtype=torch.float64)).float().reshape(1, *LATENT)
        cond = backbone.encode_text(["c0", "c1", "c2"])
        losses = run_estimators(backbone, x, cond, f"analytic:{p}", batch_size=1024)
        # loss_c = -log p(x|c) + const: minus the truncated log-likelihood relative to class 0
        losses["elbo/exact"] = [-backbone.truncated_log_lik_diff(x, c, 0) for c in range(3)]
        records.append({"id": p, "spread": spread, "true_class": cls, "losses": losses})
    summary = summarize(records, boots=args.bootstrap, exact_key="elbo/exact")
    return {"benchmark": "elbo_fidelity", "backbone": "analytic-gaussian-epsilon",
            "command": command_line("elbo_fidelity.py", args.argv), "machine": machine(),
            "problems": args.problems, "seconds": round(time.perf_counter() - tic, 1), **summary}


# --------------------------------------------------------------------------------------------
# toy model
# --------------------------------------------------------------------------------------------
def toy_items(n: int) -> list[tuple[str, int]]:
    """``n`` (split, index) items, val and test interleaved 2:3 (val has 200 images, test 500)."""
    out, v, t = [], 0, 0
    while len(out) < n and (v < 200 or t < 500):
        for _ in range(2):
            if v < 200 and len(out) < n:
                out.append(("val", v)); v += 1
        for _ in range(3):
            if t < 500 and len(out) < n:
                out.append(("test", t)); t += 1
    return out


def run_toy_records(args: argparse.Namespace) -> None:
    from t2ialign.core.host import Host

    torch.set_num_threads(args.threads)
    rank, world = (int(v) for v in args.shard.split("/"))
    args.records.mkdir(parents=True, exist_ok=True)
    path = args.records / f"records.rank{rank}.jsonl"
    repair_jsonl(path)  # a killed run may have left half a line
    done = {r["key"] for p in args.records.glob("records.rank*.jsonl") for r in read_jsonl(p)}
    host = Host()
    backbone = host.backbone("toy", device="cpu")
    datasets = {s: host.dataset("toy_shapes", s) for s in ("val", "test")}
    items = [it for k, it in enumerate(toy_items(args.images)) if k % world == rank]
    todo = [it for it in items if f"{it[0]}:{it[1]}" not in done]
    print(f"shard {rank}/{world}: {len(items)} items, {len(todo)} to do", file=sys.stderr, flush=True)
    for count, (split, i) in enumerate(todo, 1):
        tic = time.perf_counter()
        sample = datasets[split][i]
        words = [datasets[split].class_names[c] for c in sample.classes]
        key = f"{split}:{i}"
        rec: dict[str, Any] = {"key": key, "id": sample.id, "split": split, "classes": words}
        if len(words) >= 2:
            with torch.no_grad():
                z0 = backbone.encode_image(image_to_tensor(sample.image).to(backbone.device))
                cond = backbone.encode_text([f"a photo of {w}" for w in words])
                rec["losses"] = run_estimators(backbone, z0, cond, key, args.batch_size, TOY_SET)
        rec["seconds"] = round(time.perf_counter() - tic, 2)
        append_jsonl(path, rec)
        if count % 10 == 0:
            print(f"shard {rank}: {count}/{len(todo)} ({rec['seconds']} s last)", file=sys.stderr, flush=True)


def summarize_toy(args: argparse.Namespace) -> dict[str, Any]:
    recs = {r["key"]: r for p in sorted(args.records.glob("records.rank*.jsonl")) for r in read_jsonl(p)}
    scored = [r for r in recs.values() if "losses" in r]
    by_split = {s: sum(1 for r in recs.values() if r["split"] == s) for s in ("val", "test")}
    summary = summarize(scored, boots=args.bootstrap)
    return {"benchmark": "elbo_fidelity", "backbone": "toy",
            "command": command_line("elbo_fidelity.py", args.argv), "machine": machine(),
            "images_done": len(recs), "images_requested": args.images, "images_by_split": by_split,
            "images_with_2plus_classes": len(scored),
            "seconds_per_scored_image": round(float(np.mean([r["seconds"] for r in scored])), 2) if scored else None,
            **summary}


def markdown_table(report: dict[str, Any]) -> str:
    """The docs' table of one summary: the reference row, then each estimator by sample-forwards."""
    own = report["vs_own_scheme_target"]
    ref = own["reference"]
    lines = ["| estimator | forwards / class | pair agreement | top-1 | score error | diff. corr. | "
             "not worse (point) | not signif. worse |", "|---|---|---|---|---|---|---|---|",
             f"| **reference** `{REFERENCE}` | 20 | {ref['pair_agreement']:.3f} | {ref['top1']:.3f} | "
             f"{ref['score_error']:.3f} | {ref['diff_corr']:.3f} | | |"]

    def cell(row: dict[str, Any], m: str) -> str:
        v = row[f"{m}_vs_reference"]
        return f"{row[m]:.3f} ({v['diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}])"

    for name, row in sorted(own["estimators"].items(), key=lambda kv: (kv[1]["forwards_per_class"], kv[0])):
        if name == REFERENCE:
            continue
        lines.append(f"| `{name}` | {row['forwards_per_class']} | {cell(row, 'pair_agreement')} | {row['top1']:.3f} | "
                     f"{cell(row, 'score_error')} | {cell(row, 'diff_corr')} | "
                     f"{'yes' if row['not_worse_point'] else 'no'} | {'yes' if row['not_significantly_worse'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["analytic", "toy"])
    parser.add_argument("--problems", type=int, default=500, help="analytic: number of random problems")
    parser.add_argument("--images", type=int, default=500, help="toy: val+test images (interleaved 2:3)")
    parser.add_argument("--records", type=Path, default=RESULTS / "elbo_fidelity_toy",
                        help="toy: folder of the per-image JSON lines")
    parser.add_argument("--shard", default="0/1", help="toy: RANK/WORLD, items k with k %% WORLD == RANK")
    parser.add_argument("--summarize", action="store_true", help="toy: only summarise the records so far")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--table", type=Path, default=None, metavar="JSON",
                        help="print the markdown table of a written summary (docs/elbo.md) and exit")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.table is not None:
        import json

        print(markdown_table(json.loads(args.table.read_text())))
        return 0
    if args.part == "analytic":
        torch.set_num_threads(args.threads)
        report = run_analytic(args)
    else:
        if not args.summarize:
            run_toy_records(args)
            if args.shard != "0/1":
                return 0  # each shard only writes records; summarise once all are done
        report = summarize_toy(args)
        analytic = RESULTS / "elbo_fidelity_analytic.json"
        if analytic.is_file() and report["images_with_2plus_classes"]:
            import json

            report["preset_decision"] = decide({"analytic": json.loads(analytic.read_text()), "toy": report})
    write_result(args.out or RESULTS / f"elbo_fidelity_{args.part}.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
