"""Compositional generation with ELBO phrase weighting (method-spec §9), scored by CLIP score and the toy oracle.

At every denoising step ``k < elbo_steps`` of a prompt with at least two noun phrases:

1. the denoiser predicts once for the full prompt and once per phrase alone, at the same ``z_t``:
   ``d_p = mean((pred(z_t, prompt) - pred(z_t, phrase_p))^2)`` -- how much of phrase ``p`` the
   full prompt's prediction is missing (a discrepancy proxy of the phrase's ELBO, not a
   noise-target loss; method-spec §15.11);
2. ``w_p = strength ** minmax(d)_p`` with an epsilon guard (equal discrepancies give all 1), so
   ``w`` lies in ``[1, strength]`` and the least represented phrase gets ``strength``;
3. the phrase's token embeddings in the prompt's embedding are pushed away from the empty
   prompt's: ``e_tok <- e_empty_tok + w_p * (e_tok - e_empty_tok)`` (what Compel does for a
   ``(phrase)w`` weight; the reference re-encodes a Compel prompt, we edit the embedding
   directly, without the reference's rounding of ``w`` to two decimals);
4. the usual classifier-free-guidance step with the re-weighted conditional embedding.

Native predictions are compared directly: converting epsilon/v/flow predictions to epsilon
multiplies every ``d_p`` of a step by the same factor, which min-max normalisation removes.

A *baseline* image (no weighting) and a *weighted* image are drawn from the same seed for every
prompt (reference: seed ``4307 + image index``), so pairs differ only by the weighting.
Per-prompt records, PNGs, side-by-side grids, ``results.json`` (CLIP score per variant with a
95% CI over prompts, the paired difference, toy-oracle accuracies) and ``report.html`` are
written; a rerun resumes, ``accelerate launch`` shards prompts over processes.

The weighting touches only the positions ``backbone.token_spans`` returns, so it works for every
backbone whose text condition is a token sequence (SD 1.x/2.x, SDXL, toy; for SD3 the CLIP part
of the joint sequence) -- sampling additionally needs ``backbone.decode_latents``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from t2ialign.core.config import dump_config
from t2ialign.core.errors import ConfigError, InputError
from t2ialign.core.fileio import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    ensure_writable_dir,
    read_jsonl,
    repair_jsonl,
)
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.phrases import resolve_phrases
from t2ialign.core.protocols import Backbone, TextCond
from t2ialign.core.sampling import sample
from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign.core.stats import mean_ci95
from t2ialign.plugins.tasks.common import Procs, check_weights, claimed_output, record_weights, safe_name, versions

if TYPE_CHECKING:
    from t2ialign.core.host import Host

DEFAULTS: dict[str, Any] = {
    "backbone": "toy",
    "dataset": "toy_prompts",
    "split": "test",
    "limit": None,
    "device": "cpu",
    "dtype": "float32",
    "seed": 4307,
    "output": "runs/generation",
    "steps": 50,
    "guidance": 7.5,
    "negative": "",
    "strength": 1.2,
    "elbo_steps": None,  # None = every step (the reference's 50 of 50)
    "images_per_prompt": 1,
    "phrase_extractor": "auto",
    "phrases": {},  # prompt text or sample id -> list of phrases (overrides extraction)
    "clip_metric": "auto",  # auto: clip_score_toy for the toy backbone, clip_score otherwise; null: none
    "oracle": "auto",  # auto: toy_oracle when the samples list their objects; null: none
    "visuals": 16,
}

#: config keys whose change invalidates stored images and records
RESULT_KEYS = ("backbone", "dataset", "split", "dtype", "seed", "steps", "guidance", "negative", "strength",
               "elbo_steps", "images_per_prompt", "phrase_extractor", "phrases", "clip_metric", "oracle")
VARIANTS = ("baseline", "weighted")
_GUARD = 1e-8


# --------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------
def phrase_weights(d: torch.Tensor, strength: float) -> torch.Tensor:
    """``strength ** minmax(d)``; all ones when the discrepancies are (nearly) equal."""
    d = torch.as_tensor(d, dtype=torch.float64)
    span = float(d.max() - d.min())
    # relative guard: differences at float-rounding level carry no ranking, weight nothing
    if span <= _GUARD * float(d.abs().max()) or span == 0.0:
        return torch.ones_like(d)
    return float(strength) ** ((d - d.min()) / span)


def reweight_embeddings(cond: TextCond, empty: TextCond, spans: Sequence[Sequence[int]],
                        weights: Sequence[float]) -> TextCond:
    """``e_tok <- e_empty_tok + w * (e_tok - e_empty_tok)`` at each phrase's token positions.

    ``cond``/``empty``: the prompt's and the empty prompt's encodings (same sequence length).
    Pooled embeddings and extras are kept as they are.
    """
    embeds = cond.embeds.clone()
    base = empty.embeds.to(embeds.device, embeds.dtype)
    for span, w in zip(spans, weights):
        idx = torch.as_tensor(list(span), dtype=torch.long, device=embeds.device)
        e0 = base[:, idx]
        embeds[:, idx] = e0 + float(w) * (embeds[:, idx] - e0)
    return TextCond(embeds=embeds, pooled=cond.pooled, extra=dict(cond.extra))


class PhraseWeighting:
    """The per-step ``cond_fn`` of :func:`~t2ialign.core.sampling.sample` that applies ELBO phrase weighting.

    ``log`` collects ``{"step", "t", "d", "w"}`` of every weighted step.
    """

    def __init__(self, backbone: Backbone, prompt: str, phrases: Sequence[str], *, strength: float = 1.2,
                 elbo_steps: int | None = None, empty: TextCond | None = None):
        if not float(strength) >= 1.0:
            raise ConfigError(f"strength must be >= 1, got {strength}", where="config key strength",
                              fix="use e.g. strength=1.2 (reference); 1 disables the weighting")
        self.backbone = backbone
        self.prompt = prompt
        self.phrases = list(phrases)
        self.strength = float(strength)
        self.elbo_steps = elbo_steps
        self.spans = [backbone.token_spans(prompt, p) for p in self.phrases]
        self.cond = backbone.encode_text([prompt])
        self.empty = empty if empty is not None else backbone.encode_text([""])
        self.phrase_conds = backbone.encode_text(self.phrases) if self.phrases else None
        self.log: list[dict[str, Any]] = []
        self.forwards = 0

    @property
    def active(self) -> bool:
        """The reference weights only prompts with at least two phrases (min-max needs two)."""
        return len(self.phrases) >= 2 and self.strength > 1.0

    @torch.no_grad()
    def __call__(self, step: int, t: int, z_t: torch.Tensor) -> TextCond:
        if not self.active or (self.elbo_steps is not None and step >= self.elbo_steps):
            return self.cond
        n = 1 + len(self.phrases)
        z = z_t.expand(n, *z_t.shape[1:])
        pred = self.backbone.predict(z, torch.full((n,), float(t)), TextCond.cat([self.cond, self.phrase_conds]))
        self.forwards += n
        d = ((pred[:1] - pred[1:]) ** 2).flatten(1).mean(1).double().cpu()
        w = phrase_weights(d, self.strength)
        self.log.append({"step": int(step), "t": int(t), "d": d.tolist(), "w": w.tolist()})
        return reweight_embeddings(self.cond, self.empty, self.spans, w.tolist())

    def summary(self) -> dict[str, Any]:
        """Mean/min/max weight per phrase over the weighted steps and how often each got the top weight."""
        if not self.log:
            return {"steps_weighted": 0}
        w = np.array([e["w"] for e in self.log])
        return {"steps_weighted": len(self.log),
                "mean": np.round(w.mean(0), 4).tolist(), "min": np.round(w.min(0), 4).tolist(),
                "max": np.round(w.max(0), 4).tolist(),
                "top_fraction": np.round((w.argmax(1)[:, None] == np.arange(w.shape[1])).mean(0), 4).tolist()}


@dataclass
class PairResult:
    """Baseline and weighted images of one prompt and seed, with the weighting's trace."""

    prompt: str
    phrases: list[str]
    spans: list[list[int]]
    seed: int
    baseline: np.ndarray
    weighted: np.ndarray
    weighting: PhraseWeighting
    timings: dict[str, float] = field(default_factory=dict)


def generate_pair(backbone: Backbone, prompt: str, phrases: Sequence[str], *, seed: int, steps: int = 50,
                  guidance: float = 7.5, strength: float = 1.2, elbo_steps: int | None = None,
                  negative: str = "", empty: TextCond | None = None) -> PairResult:
    """Draw the baseline and the ELBO-weighted image of ``prompt`` from the same seed."""
    check_can_generate(backbone)
    weighting = PhraseWeighting(backbone, prompt, phrases, strength=strength, elbo_steps=elbo_steps, empty=empty)
    tic = time.perf_counter()
    base, _ = sample(backbone, prompt, steps=steps, guidance=guidance, seed=seed, negative=negative)
    t_base = time.perf_counter() - tic
    tic = time.perf_counter()
    weighted, _ = sample(backbone, prompt, steps=steps, guidance=guidance, seed=seed, negative=negative,
                         cond_fn=weighting)
    t_weighted = time.perf_counter() - tic
    return PairResult(prompt, list(phrases), [list(s) for s in weighting.spans], int(seed), base, weighted,
                      weighting, {"baseline_s": t_base, "weighted_s": t_weighted})


def check_can_generate(backbone: Backbone) -> None:
    """Fail before any work when the backbone cannot draw images through the sampler."""
    if getattr(backbone, "decode_latents", None) is None:
        raise InputError(
            f"backbone '{backbone.name}' ({type(backbone).__name__}, attention kind "
            f"{getattr(backbone, 'attention_kind', '?')}) has no decode_latents: generation is not supported for it",
            where="task generation",
            fix="use an SD 1.x/2.x, SDXL or toy backbone, or add decode_latents(z) to its plugin",
        )


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------
def _check_config(config: dict[str, Any]) -> None:
    for key in ("steps", "images_per_prompt"):
        v = config[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key} must be a positive integer, got {v!r}", where=f"config key {key}",
                              fix=f"e.g. {key}={DEFAULTS[key]}")
    e = config["elbo_steps"]
    if e is not None and (isinstance(e, bool) or not isinstance(e, int) or e < 0):
        raise ConfigError(f"elbo_steps must be a non-negative integer or null (all steps), got {e!r}",
                          where="config key elbo_steps", fix="e.g. elbo_steps=25, or elbo_steps=null")
    for key, low in (("guidance", 0.0), ("strength", 1.0)):
        v = float(config[key])
        if not (math.isfinite(v) and v >= low):  # a NaN would reach every image and results.json
            raise ConfigError(f"{key} must be a finite number >= {low:g}, got {config[key]!r}",
                              where=f"config key {key}", fix=f"e.g. {key}={DEFAULTS[key]}")
    lim = config["limit"]
    if lim is not None and (isinstance(lim, bool) or not isinstance(lim, int) or lim < 1):
        raise ConfigError(f"limit must be a positive number of prompts or null (all), got {lim!r}",
                          where="config key limit", fix="e.g. limit=64")
    if not isinstance(config["phrases"], dict):
        raise ConfigError("phrases must map a prompt (or sample id) to its list of phrases",
                          where="config key phrases", fix='e.g. phrases: {"a red cube and a blue sphere": ["a red cube", "a blue sphere"]}')


def _metric_name(value: Any, auto: str | None) -> str | None:
    if value in (None, "", "none", "null", False):
        return None
    return auto if value == "auto" else str(value)


class GenerationTask:
    """Compositional generation, baseline vs ELBO phrase weighting (see module docstring)."""

    name = "generation"
    defaults = DEFAULTS

    def _phrases(self, sample_, config: dict[str, Any], extractor: Any) -> list[str]:
        given = config["phrases"].get(sample_.prompt) or config["phrases"].get(sample_.id) or sample_.phrases
        return resolve_phrases(sample_.prompt, given, extractor)

    def _one(self, sample_, index: int, backbone, config, extractor, empty, clip, oracle, out: Path) -> dict[str, Any]:
        """Generate, save and score one prompt's image pairs; returns its record."""
        from t2ialign.core.report import save_png

        record: dict[str, Any] = {"id": sample_.id, "index": index, "prompt": sample_.prompt}
        phrases = self._phrases(sample_, config, extractor)
        record["phrases"] = phrases
        images: dict[str, list[np.ndarray]] = {v: [] for v in VARIANTS}
        record["images"] = {v: [] for v in VARIANTS}
        record["seeds"], record["weights"], record["timings"] = [], [], []
        forwards = 0
        for k in range(int(config["images_per_prompt"])):
            seed = int(config["seed"]) + k
            pair = generate_pair(backbone, sample_.prompt, phrases, seed=seed, steps=config["steps"],
                                 guidance=config["guidance"], strength=config["strength"],
                                 elbo_steps=config["elbo_steps"], negative=config["negative"], empty=empty)
            record["spans"] = pair.spans
            record["seeds"].append(seed)
            record["weights"].append(pair.weighting.summary())
            record["timings"].append({k2: round(v, 4) for k2, v in pair.timings.items()})
            forwards += pair.weighting.forwards
            for v in VARIANTS:
                img = getattr(pair, v)
                images[v].append(img)
                rel = f"images/{safe_name(sample_.id)}_{k}_{v}.png"
                save_png(out / rel, img)
                record["images"][v].append(rel)
        record["weighting_forwards"] = forwards
        if clip is not None:
            record["clip"] = {v: [round(float(s), 5) for s in clip.score(images[v], [sample_.prompt] * len(images[v]))]
                              for v in VARIANTS}
        objects = sample_.meta.get("objects") if isinstance(sample_.meta, dict) else None
        if oracle is not None and objects:
            record["oracle"] = {}
            for v in VARIANTS:
                checks = [oracle.check(img, objects) for img in images[v]]
                record["oracle"][v] = [{"objects": c["objects"], "full": c["full"]} for c in checks]
        _write_grid(out, sample_, record, images)
        return record

    def run(self, config: dict[str, Any], host: Host) -> dict[str, Any]:
        _check_config(config)
        procs = Procs()
        out = Path(config["output"])
        with claimed_output(out, config, RESULT_KEYS, procs):
            t0 = time.perf_counter()
            backbone = host.backbone(config["backbone"], device=config["device"], dtype=config["dtype"])
            weights = check_weights(out, backbone)
            check_can_generate(backbone)
            dataset = host.dataset(config["dataset"], config["split"])
            extractor = host.phrase_extractor(config["phrase_extractor"])
            clip_name = _metric_name(config["clip_metric"],
                                     "clip_score_toy" if config["backbone"] == "toy" else "clip_score")
            clip = host.metric(clip_name) if clip_name else None
            n = len(dataset) if config["limit"] is None else min(int(config["limit"]), len(dataset))
            has_objects = n > 0 and bool(dataset[0].meta.get("objects"))
            oracle_name = _metric_name(config["oracle"], "toy_oracle" if has_objects else None)
            oracle = host.metric(oracle_name) if oracle_name else None
            empty = backbone.encode_text([""])
            t_setup = time.perf_counter() - t0
            # written once everything could be built, so a typo does not lock the folder to a bad config
            if procs.rank == 0:
                atomic_write_text(out / "config.yaml", dump_config(config))
                record_weights(out, weights)

            from tqdm import tqdm

            from t2ialign.core.console import progress_disabled

            (out / "images").mkdir(parents=True, exist_ok=True)
            done = {r["id"] for p in out.glob("records.*.jsonl") for r in read_jsonl(p)}
            records_path = out / f"records.rank{procs.rank}.jsonl"
            repair_jsonl(records_path)
            todo = [i for i in range(procs.rank, n, procs.world) if dataset[i].id not in done]
            tic = time.perf_counter()
            for i in tqdm(todo, desc="generation", unit="prompt", disable=progress_disabled(), dynamic_ncols=True):
                sample_ = dataset[i]
                if not sample_.prompt:
                    raise InputError(f"item {sample_.id} of dataset {dataset.name} has no prompt",
                                     where=f"dataset {config['dataset']}", fix="use a prompt dataset")
                try:
                    record = self._one(sample_, i, backbone, config, extractor, empty, clip, oracle, out)
                except InputError as exc:  # e.g. a phrase whose tokens fall past the 77-token limit
                    record = {"id": sample_.id, "index": i, "prompt": sample_.prompt, "error": str(exc)}
                append_jsonl(records_path, record)
            t_gen = time.perf_counter() - tic
            procs.barrier()
            if procs.rank != 0:
                return {}
            records = sorted((r for p in out.glob("records.*.jsonl") for r in read_jsonl(p)),
                             key=lambda r: r["index"])
            records = [r for r in records if r["index"] < n]
            results = _assemble(config, records, clip_name, oracle_name,
                                {"setup_s": round(t_setup, 3), "generation_s": round(t_gen, 3)}, procs.world)
            atomic_write_json(out / "results.json", results)
            _write_report(out, results, records, int(config["visuals"]))
            return results


# --------------------------------------------------------------------------------------------
# results and visuals
# --------------------------------------------------------------------------------------------
def _oracle_counts(checks: list[dict[str, Any]]) -> tuple[int, int, int, int, int]:
    objs = [o for c in checks for o in c["objects"]]
    return (len(objs), sum(o["object"] for o in objs), sum(o["attribute"] for o in objs),
            len(checks), sum(bool(c["full"]) for c in checks))


def _assemble(config, records, clip_name, oracle_name, timings, world) -> dict[str, Any]:
    ok = [r for r in records if "error" not in r]
    results: dict[str, Any] = {
        "task": "generation", "backbone": config["backbone"], "dataset": config["dataset"],
        "prompts": len(ok), "images": len(ok) * int(config["images_per_prompt"]), "failed_prompts": [{"id": r["id"], "error": r["error"]} for r in records if "error" in r],
        "images_per_prompt": config["images_per_prompt"], "seed": config["seed"], "steps": config["steps"],
        "guidance": config["guidance"], "strength": config["strength"], "elbo_steps": config["elbo_steps"],
        "clip_metric": clip_name, "oracle": oracle_name, "variants": {v: {} for v in VARIANTS},
        "differences_weighted_minus_baseline": {},
        "weighted_prompts": sum(1 for r in ok if any(w.get("steps_weighted", 0) for w in r["weights"])),
    }
    lines = []
    if clip_name:
        per_prompt = {v: [float(np.mean(r["clip"][v])) for r in ok if "clip" in r] for v in VARIANTS}
        for v in VARIANTS:
            s = mean_ci95(per_prompt[v])
            results["variants"][v]["clip_score"] = {"mean": s["mean"], "ci95_low": s["ci95_low"],
                                                    "ci95_high": s["ci95_high"], "prompts": s["n"]}
            lines.append(f"  {v:<9} CLIP score {s['mean']:7.3f}  (95% CI {s['ci95_low']:.3f} .. {s['ci95_high']:.3f})")
        diff = mean_ci95(np.array(per_prompt["weighted"]) - np.array(per_prompt["baseline"]))
        results["differences_weighted_minus_baseline"]["clip_score"] = {
            "delta": diff["mean"], "ci95_low": diff["ci95_low"], "ci95_high": diff["ci95_high"], "paired_prompts": diff["n"]}
        lines.append(f"  weighted - baseline: {diff['mean']:+.3f} CLIP score "
                     f"(paired 95% CI {diff['ci95_low']:+.3f} .. {diff['ci95_high']:+.3f})")
    with_oracle = [r for r in ok if "oracle" in r]
    if oracle_name and with_oracle:
        full_per_prompt = {}
        # per prompt: share of its requested objects found (any colour) / found in their colour
        share = {kind: {v: np.array([np.mean([o[kind] for c in r["oracle"][v] for o in c["objects"]])
                                     for r in with_oracle]) for v in VARIANTS} for kind in ("object", "attribute")}
        for v in VARIANTS:
            n_obj, obj_hit, attr_hit, n_img, full_hit = _oracle_counts([c for r in with_oracle for c in r["oracle"][v]])
            results["variants"][v]["oracle"] = {
                "object_accuracy": obj_hit / n_obj if n_obj else float("nan"),
                "attribute_accuracy": attr_hit / n_obj if n_obj else float("nan"),
                "full_accuracy": full_hit / n_img if n_img else float("nan"), "objects": n_obj, "images": n_img}
            full_per_prompt[v] = np.array([np.mean([c["full"] for c in r["oracle"][v]]) for r in with_oracle])
            o = results["variants"][v]["oracle"]
            lines.append(f"  {v:<9} oracle: objects {o['object_accuracy']:.3f}, attributes "
                         f"{o['attribute_accuracy']:.3f}, full prompts {o['full_accuracy']:.3f}")
        paired = {"oracle_full_accuracy": full_per_prompt["weighted"] - full_per_prompt["baseline"],
                  **{f"oracle_{kind}_accuracy": share[kind]["weighted"] - share[kind]["baseline"]
                     for kind in ("object", "attribute")}}
        for key, diffs in paired.items():
            d = mean_ci95(diffs)
            results["differences_weighted_minus_baseline"][key] = {
                "delta": d["mean"], "ci95_low": d["ci95_low"], "ci95_high": d["ci95_high"], "paired_prompts": d["n"]}
    results["summary_lines"] = lines
    per = [t for r in ok for t in r["timings"]]
    results["timings"] = {**timings, "per_image_mean_s": {
        k: round(float(np.mean([t[k] for t in per])), 4) for k in (per[0] if per else {})}}
    results["versions"] = versions()
    results["processes"] = world
    return results


def _scale_for(image: np.ndarray) -> int:
    return max(1, 192 // max(image.shape[:2]))


def _write_grid(out: Path, sample_, record: dict[str, Any], images: dict[str, list[np.ndarray]]) -> None:
    from t2ialign.core.report import panel, save_png

    tiles = []
    for k in range(len(images["baseline"])):
        for v in VARIANTS:
            title = f"{v} (seed {record['seeds'][k]})"
            if "clip" in record:
                title += f" CLIP {record['clip'][v][k]:.1f}"
            tiles.append((title, images[v][k]))
    rel = f"grids/{safe_name(sample_.id)}.png"
    save_png(out / rel, panel(tiles, columns=2, scale=_scale_for(images["baseline"][0])))
    record["grid"] = rel


def _write_report(out: Path, results: dict[str, Any], records: list[dict[str, Any]], visuals: int) -> None:
    from t2ialign.core.report import write_html_report

    tables = []
    rows = []
    for v, res in results["variants"].items():
        c, o = res.get("clip_score", {}), res.get("oracle", {})
        rows.append([v, c.get("mean"), c.get("ci95_low"), c.get("ci95_high"), o.get("object_accuracy"),
                     o.get("attribute_accuracy"), o.get("full_accuracy")])
    tables.append(("per variant (CLIP score = 100 x cosine, mean over prompts, 95% t-interval; oracle on toy prompts)",
                   ["variant", "CLIP score", "CI95 low", "CI95 high", "object acc.", "attribute acc.", "full acc."],
                   rows))
    diffs = [[k, d.get("delta"), d.get("ci95_low"), d.get("ci95_high"), d.get("paired_prompts")]
             for k, d in results["differences_weighted_minus_baseline"].items()]
    if diffs:
        tables.append(("weighted - baseline, paired over prompts (same seeds)",
                       ["measure", "delta", "CI95 low", "CI95 high", "prompts"], diffs))
    prompt_rows = []
    for r in records[: max(visuals * 4, 50)]:
        if "error" in r:
            prompt_rows.append([r["id"], r["prompt"], "error: " + r["error"].splitlines()[0], None, None])
            continue
        w = r["weights"][0]
        weights = ", ".join(f"{p}: {m:.3f}" for p, m in zip(r["phrases"], w.get("mean", []))) or "-"
        clip = r.get("clip", {})
        prompt_rows.append([r["id"], r["prompt"], weights,
                            float(np.mean(clip["baseline"])) if clip else None,
                            float(np.mean(clip["weighted"])) if clip else None])
    tables.append(("prompts (mean phrase weight over the weighted steps)",
                   ["id", "prompt", "phrase weights", "CLIP baseline", "CLIP weighted"], prompt_rows))
    images = [(r["prompt"], r["grid"]) for r in records if "grid" in r][:visuals]
    summary = {"backbone": results["backbone"], "dataset": results["dataset"], "prompts": results["prompts"],
               "steps": results["steps"], "guidance": results["guidance"], "strength": results["strength"],
               "seed": results["seed"]}
    write_html_report(out / "report.html", title=f"t2ialign generation: {results['backbone']} on {results['dataset']}",
                      summary=summary, tables=tables, images=images,
                      notes=["Each grid: baseline (left) and ELBO phrase-weighted (right) image from the same seed."])


# --------------------------------------------------------------------------------------------
# plugin hooks
# --------------------------------------------------------------------------------------------
@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"tasks": {"generation": {}}},
                      description="compositional generation with ELBO phrase weighting; CLIP score and toy oracle")


@hookimpl
def t2ialign_make_task(spec: EntrySpec) -> GenerationTask | None:
    return GenerationTask() if spec.plugin == "generation" else None


__all__ = [
    "DEFAULTS",
    "GenerationTask",
    "PairResult",
    "PhraseWeighting",
    "check_can_generate",
    "generate_pair",
    "phrase_weights",
    "reweight_embeddings",
]
