"""Speed and memory of the alignment pipeline against the physical limit and the reference schedule.

Every number is a ratio of two things measured side by side in one process (interleaved, the
median of ``--repeats``), so a busy machine slows both sides alike:

a. **limit ratio** = pipeline wall time per image / wall time of the bare denoiser forwards the
   pipeline needs (same count, batched the same way, no capture, no text/VAE encoding, no
   post-processing). Target <= 1.10 at K = 2 (issue 16; 1.15 before).
b. **vs reference schedule** = the reference code's schedule re-created here / our pipeline:
   batch 1, one timestep at a time, one forward per class per ELBO timestep, and on EVERY
   attention layer an explicit-softmax processor (``softmax(QK^T*scale)`` per head, head-averaged
   into a store, output ``P V``) like the reference's processors; then the same post-processing
   as ours. Target >= 3 for K = 2, 4, 8 classes. ``reference_over_preset``: the same with ours
   running the ELBO preset ``--elbo-preset`` (default ``fast``, docs/elbo.md) instead of the
   reference grid.
c. **capture overhead** = one denoiser forward (collect batch) with cross-only capture of the
   layers/columns the aggregation uses / the same forward without capture. Target <= 1.10.
   The overhead of the pipeline's full capture (cross + the self layers it propagates with) is
   reported next to it, for each ``--self-maps`` mode (target for the pipeline's mode <= 1.15,
   issue 16; every run's time is kept, so the spread of single runs shows): ``fused`` records the layers' q/k and
   applies them to the class maps later (one SDPA per layer and step, timed here on that forward's
   rows and reported as "with propagation"), ``explicit`` forms the head/time-averaged ``Q x Q``
   maps during the forward.
d. **memory**: peak RSS of a fresh subprocess (``resource.getrusage``) that loads the backbone and
   runs the pipeline once, vs the number of collect timesteps (must be flat: maps are running
   means, never kept per step) and vs the number of classes, for each ``--self-maps`` mode: the
   fused path keeps q/k per collect timestep, so its growth in MiB per collect step is reported
   (and the bytes per collect timestep and layer, from the capture measurement).

CPU time (``time.process_time``) ratios are reported next to wall ratios: on a machine shared
with other jobs they are the steadier number.

    python benchmarks/speed.py --backbone toy
    python benchmarks/speed.py --backbone tiny-random --smoke
    python benchmarks/speed.py --backbone sd15-config --collect-steps 2 --elbo-steps 1 --repeats 1 \
        --memory-collect 1 2 4 --memory-classes 2 4
    python benchmarks/speed.py --backbone sd15-config --capture-only --capture-repeats 3   # (c) alone
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, build_backbone, command_line, machine, write_result  # noqa: E402

from t2ialign.core.aggregation import (  # noqa: E402
    SelfPropagation,
    aggregate_cross,
    aggregate_self,
    propagate,
    self_layer_weights,
    self_steps,
)
from t2ialign.core.attention_store import AttentionStore  # noqa: E402
from t2ialign.core.calibration import alignment_scores, calibrate, minmax  # noqa: E402
from t2ialign.core.pipeline import AlignmentPipeline, Variant, image_to_tensor  # noqa: E402
from t2ialign.core.timesteps import parse_timesteps  # noqa: E402
from t2ialign.plugins.toy.dataset import ToyShapes  # noqa: E402
from t2ialign.plugins.toy.world import CLASS_NAMES, WorldConfig  # noqa: E402
from t2ialign.core.elbo_presets import ELBO_PRESETS  # noqa: E402
from t2ialign.plugins.weightings import ELBOWeighting, UniformWeighting  # noqa: E402

VARIANTS = [Variant("baseline", 1.0), Variant("calibrated", 1 / 3)]
#: issue 16's targets: limit ratio at K = 2 (was 1.15), the pipeline's capture forward (batch 10)
LIMIT_TARGET = 1.10
PIPELINE_CAPTURE_TARGET = 1.15


# --------------------------------------------------------------------------------------------
# the schedules
# --------------------------------------------------------------------------------------------
def timestep_specs(collect_steps: int, elbo_steps: int) -> tuple[list[list[int]], list[list[int]]]:
    """Reference-style grids with the requested counts: collect t = 20, 40, ... (small t, like the
    reference's ``[[20, 201, 20]]``); ELBO t evenly spread over ``[1, 999)`` (``[[1, 999, 50]]`` at 20)."""
    collect = [[20, 20 * collect_steps + 1, 20]]
    stride = max(1, 999 // elbo_steps) if elbo_steps < 20 else 50
    elbo = [[1, 1 + stride * elbo_steps, stride]]
    assert len(parse_timesteps(collect)) == collect_steps and len(parse_timesteps(elbo)) == elbo_steps
    return collect, elbo


def make_pipeline(backbone: Any, extractor: Any, args: argparse.Namespace,
                  self_maps: str | None = None, preset: str | None = None) -> AlignmentPipeline:
    collect, elbo = timestep_specs(args.collect_steps, args.elbo_steps)
    weighting, antithetic = UniformWeighting(backbone.prediction_type), False
    if preset:  # an ELBO preset (core/elbo_presets.py) in place of the --elbo-steps reference grid
        p = ELBO_PRESETS[preset]
        weighting = (UniformWeighting if p["scheme"] == "uniform" else ELBOWeighting)(backbone.prediction_type)
        elbo, antithetic = p["timesteps"], p["antithetic"]
    return AlignmentPipeline(backbone, extractor, weighting, collect_timesteps=collect, elbo_timesteps=elbo,
                             collect_batch_size=args.collect_batch, elbo_batch_size=args.elbo_batch,
                             elbo_antithetic=antithetic,
                             self_maps=self_maps or args.self_maps[0], self_factor_dtype=args.factor_dtype,
                             **({} if args.factor_max_mib is None else
                                {"self_factor_max_mib": _max_mib(args.factor_max_mib)}))


def _max_mib(value: str) -> float | str | None:
    """``--factor-max-mib``: a number of MiB, ``auto``, ``explicit`` or ``unbounded`` (``self_factors.max_mib``)."""
    return value if value in ("explicit", "auto", "unbounded") else float(value)


def bench_image(backbone: Any) -> np.ndarray:
    """A toy scene at the backbone's working size (content does not change the cost)."""
    world = ToyShapes("test", 1, WorldConfig(image_size=64))
    image = world[0].image
    reps = max(1, backbone.image_size // 64)
    return np.kron(image, np.ones((reps, reps, 1), dtype=np.uint8)) if reps > 1 else image


def bare_forwards(backbone: Any, pipe: AlignmentPipeline, z0: torch.Tensor, words: list[str]) -> Callable[[], None]:
    """The denoiser calls the pipeline makes for ``words``, inputs prepared in advance."""
    n_collect = len(parse_timesteps(pipe.collect_timesteps))
    n_elbo = len(parse_timesteps(pipe.elbo_timesteps))
    joint = backbone.encode_text([pipe.source_prompt.format(classes=", ".join(words))])
    per_class = backbone.encode_text([pipe.elbo_prompt.format(cls=w) for w in words])
    calls = []
    for start in range(0, n_collect, pipe.collect_batch_size):
        b = min(pipe.collect_batch_size, n_collect - start)
        calls.append((b, joint.select([0] * b)))
    pairs = len(words) * n_elbo if len(words) > 1 else 0
    for start in range(0, pairs, pipe.elbo_batch_size):
        idx = [p // n_elbo for p in range(start, min(start + pipe.elbo_batch_size, pairs))]
        calls.append((len(idx), per_class.select(idx)))
    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randn((b, *z0.shape[1:]), generator=gen).to(z0.device, z0.dtype),
               torch.full((b,), 500.0, device=z0.device), cond) for b, cond in calls]

    def run() -> None:
        for z_t, t, cond in inputs:
            backbone.predict(z_t, t, cond)
        _sync(backbone)
    return run


class ReferenceProcessor:
    """What the reference's processors do on every layer: explicit attention, probabilities stored.

    ``P = softmax(Q K^T * scale)`` per head (``Attention.get_attention_scores``), head-averaged
    into the store, output ``to_out(P V)``. Written for the UNet transformer attentions of SD/SDXL
    (token-shaped input, no spatial/group norm, no residual inside the attention).
    """

    def __init__(self, store: AttentionStore, kind: str, name: str) -> None:
        self.store, self.kind, self.name = store, kind, name

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **_: Any):
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None \
                or attn.residual_connection or attention_mask is not None:
            raise NotImplementedError(f"reference processor: unsupported attention layout at {self.name}")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        batch, n_q, _ = hidden_states.shape
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)
        self.store.add(self.kind, self.name, probs.view(batch, attn.heads, n_q, -1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


@contextmanager
def reference_processors(backbone: Any, store: AttentionStore) -> Iterator[None]:
    modules = dict(backbone.denoiser.named_modules())
    originals = {}
    try:
        for layer in backbone.attention_layers():
            module = modules[layer.name]
            originals[layer.name] = module.processor
            module.set_processor(ReferenceProcessor(store, layer.kind, layer.name))
        yield
    finally:
        for name, proc in originals.items():
            modules[name].set_processor(proc)


def reference_schedule(backbone: Any, pipe: AlignmentPipeline, image: np.ndarray, words: list[str]) -> dict:
    """The reference code's per-image schedule (see module docstring), with our post-processing."""
    z0 = backbone.encode_image(image_to_tensor(image).to(backbone.device))
    prompt = pipe.source_prompt.format(classes=", ".join(words))
    spans = [backbone.token_spans(prompt, w) for w in words]
    gen = torch.Generator().manual_seed(0)
    store = AttentionStore()
    with reference_processors(backbone, store):
        cond = backbone.encode_text([prompt])
        for t in parse_timesteps(pipe.collect_timesteps):
            noise = torch.randn(z0.shape, generator=gen).to(z0.device, z0.dtype)
            tt = torch.tensor([float(t)], device=z0.device)
            backbone.predict(backbone.add_noise(z0, tt, noise), tt, cond)
        cross = {n: m[0] for n, m in store.cross.items()}
        selfm = {n: m[0] for n, m in store.self_.items()}
        store.reset()
        losses = torch.zeros(len(words))
        if len(words) > 1:
            elbo_t = parse_timesteps(pipe.elbo_timesteps)
            noises = [torch.randn(z0.shape, generator=gen).to(z0.device, z0.dtype) for _ in elbo_t]
            for c, word in enumerate(words):
                cond_c = backbone.encode_text([pipe.elbo_prompt.format(cls=word)])
                for t, noise in zip(elbo_t, noises):
                    tt = torch.tensor([float(t)], device=z0.device)
                    pred = backbone.predict(backbone.add_noise(z0, tt, noise), tt, cond_c)
                    losses[c] += float((pred.float() - noise.float()).pow(2).mean())
                    store.reset()  # the reference stores these maps too; they are never used
    agg = aggregate_cross(cross, pipe.cross_layers, pipe.cross_weights, pipe.out_grid)
    maps = torch.stack([agg[span].mean(0) for span in spans])
    K = aggregate_self(selfm, pipe.self_layers, pipe.self_rows, pipe.out_grid) if pipe.self_rows else None
    out = {}
    for v in VARIANTS:
        s = torch.ones(len(words)) if v.gamma >= 1 or len(words) < 2 else alignment_scores(losses, v.gamma)
        heat = calibrate(maps, s)
        heat = propagate(K, heat) if K is not None else heat
        heat = torch.nn.functional.interpolate(heat[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
        out[v.name] = minmax(heat.flatten(1), dim=1)
    _sync(backbone)
    return out


# --------------------------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------------------------
def _sync(backbone: Any) -> None:
    if torch.device(backbone.device).type == "cuda":
        torch.cuda.synchronize(backbone.device)


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                after: Callable[[str], Any] | None = None) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of each function, run in turns so drift hits all alike;
    ``after(name)`` runs untimed after each timed call of ``name``."""
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn))
            if after is not None:
                after(name)
    return {k: {"wall_s": statistics.median(w for w, _ in s), "cpu_s": statistics.median(c for _, c in s),
                "runs": len(s), "wall_runs": [round(w, 3) for w, _ in s]} for k, s in samples.items()}


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    """Seconds rounded to 0.1 ms; counts and per-run lists as they are."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def _ratio(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {"wall": round(a["wall_s"] / b["wall_s"], 3), "cpu": round(a["cpu_s"] / max(b["cpu_s"], 1e-9), 3)}


# --------------------------------------------------------------------------------------------
# the measurements
# --------------------------------------------------------------------------------------------
def measure_schedules(backbone: Any, pipes: dict[str, AlignmentPipeline], image: np.ndarray, classes: list[int],
                      repeats: int, with_reference: bool,
                      preset: AlignmentPipeline | None = None) -> list[dict[str, Any]]:
    """(a) and (b) for each class count; ``pipes``: one pipeline per self-map mode, the first is
    "the pipeline" (the others get ``pipeline_<mode>_s`` and ``limit_ratio_<mode>``); (b) also
    for ``preset`` (ours with an ELBO preset)."""
    z0 = backbone.encode_image(image_to_tensor(image).to(backbone.device))
    modes = list(pipes)
    pipe = pipes[modes[0]]
    rows = []
    for k in classes:
        words = CLASS_NAMES[:k]
        stages: list[dict[str, float]] = []  # the pipeline's own stage timings, per timed run

        def run_pipeline() -> None:
            result = pipe.run(image, words, VARIANTS, key="bench")
            _sync(backbone)
            stages.append(result.timings)

        fns = {
            "pipeline": run_pipeline,
            "bare_forwards": bare_forwards(backbone, pipe, z0, words),
        }
        for mode in modes[1:]:
            fns[f"pipeline_{mode}"] = (lambda p: lambda: (p.run(image, words, VARIANTS, key="bench"),
                                                          _sync(backbone)))(pipes[mode])
        if with_reference:
            fns["reference"] = lambda: reference_schedule(backbone, pipe, image, words)
        if preset is not None:
            fns["pipeline_preset"] = lambda: (preset.run(image, words, VARIANTS, key="bench"), _sync(backbone))
        res = interleaved(fns, repeats)
        pairs = {"collect": len(parse_timesteps(pipe.collect_timesteps)),
                 "elbo": k * len(parse_timesteps(pipe.elbo_timesteps)) if k > 1 else 0}
        row = {"classes": k, "pairs": pairs,
               "denoiser_calls": {"ours": math.ceil(pairs["collect"] / pipe.collect_batch_size)
                                  + math.ceil(pairs["elbo"] / pipe.elbo_batch_size),
                                  "reference": pairs["collect"] + pairs["elbo"]},
               **{f"{name}_s": _rounded(r) for name, r in res.items()},
               "self_maps": modes[0],
               # where the pipeline's time goes (median over its timed runs; attention = the collect
               # forwards with capture, propagate = calibration and the deferred fused products)
               "pipeline_stages_s": {st: round(statistics.median(r.get(st, 0.0) for r in stages), 3)
                                     for st in sorted({st for r in stages for st in r})},
               "limit_ratio": _ratio(res["pipeline"], res["bare_forwards"])}
        for mode in modes[1:]:
            row[f"limit_ratio_{mode}"] = _ratio(res[f"pipeline_{mode}"], res["bare_forwards"])
        if with_reference:
            row["reference_over_pipeline"] = _ratio(res["reference"], res["pipeline"])
        if with_reference and preset is not None:
            per_class = len(parse_timesteps(preset.elbo_timesteps)) * (2 if preset.elbo_antithetic else 1)
            row["preset_elbo_pairs"] = k * per_class
            row["reference_over_preset"] = _ratio(res["reference"], res["pipeline_preset"])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def measure_capture(backbone: Any, pipe: AlignmentPipeline, image: np.ndarray, extractor: Any,
                    repeats: int, modes: list[str], k: int = 2) -> dict[str, Any]:
    """(c): one collect-batch forward with cross-only / full pipeline capture vs none.

    For each self-map mode the full capture is timed, and separately (inside the same run) the
    propagation of ``len(VARIANTS) * k`` class maps with what that forward recorded: for ``fused``
    that is where the attention products happen, so "with propagation" is its full cost."""
    words = CLASS_NAMES[:k]
    prompt = pipe.source_prompt.format(classes=", ".join(words))
    columns = sorted({i for w in words for i in backbone.token_spans(prompt, w)})
    b = min(pipe.collect_batch_size, len(parse_timesteps(pipe.collect_timesteps)))
    z0 = backbone.encode_image(image_to_tensor(image).to(backbone.device))
    gen = torch.Generator().manual_seed(0)
    z_t = torch.randn((b, *z0.shape[1:]), generator=gen).to(z0.device, z0.dtype)
    t = torch.full((b,), 100.0, device=z0.device)
    cond = backbone.encode_text([prompt]).select([0] * b)

    def plain() -> None:
        backbone.predict(z_t, t, cond)
        _sync(backbone)

    maps = torch.rand(len(VARIANTS) * k, *pipe.out_grid, generator=gen).to(z0.device)
    spread_s: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    factor_bytes: dict[str, int] = {}

    # the store of the last timed capture, propagated after its timing stopped: the forward and the
    # deferred propagation are timed apart (timing them together counted the propagation twice)
    pending: dict[str, AttentionStore] = {}

    def captured(self_layers: list[str], mode: str = "explicit") -> Callable[[], None]:
        def run() -> None:
            with extractor.capture(cross_layers=pipe.cross_names, self_layers=self_layers,
                                   token_indices=columns) as store:
                store.reduce_batch = True
                store.self_maps = mode
                backbone.predict(z_t, t, cond)
                _sync(backbone)
            if self_layers and pipe.self_rows:
                pending[mode] = store
        return run

    def propagate_pending(name: str) -> None:
        mode = name.removeprefix("pipeline_capture_")
        store = pending.pop(mode, None)
        if store is None:
            return

        def spread() -> None:
            if store.self_factors:
                SelfPropagation(store.self_factors, pipe.self_layers, pipe.self_rows, pipe.out_grid)(maps)
            else:
                selfm = {n: m[0] for n, m in store.self_.items()}
                propagate(self_steps(selfm, pipe.self_layers, pipe.self_rows, pipe.out_grid), maps)
            _sync(backbone)
        spread_s[mode].append(timed(spread))
        factor_bytes.update({n: f.nbytes for n, f in store.self_factors.items()})

    plain()  # warm-up
    res = interleaved({"plain": plain, "cross_only": captured([]),
                       **{f"pipeline_capture_{m}": captured(pipe.self_names, m) for m in modes}}, repeats,
                      after=propagate_pending)
    by_mode = {}
    for m in modes:
        cap = res[f"pipeline_capture_{m}"]
        row = {"capture_s": _rounded(cap),
               "forward": _ratio(cap, res["plain"]),
               # each repeat against the plain forward of the same turn: the spread of single runs
               "forward_runs": [round(c / p, 3) for c, p in zip(cap["wall_runs"], res["plain"]["wall_runs"])]}
        if spread_s[m]:
            prop = {"wall_s": statistics.median(w for w, _ in spread_s[m]),
                    "cpu_s": statistics.median(c for _, c in spread_s[m])}
            row["propagation_s"] = _rounded(prop)
            if m == "fused":
                # one attention product per (step, layer with a non-zero weight in that step)
                row["propagation_layer_applications"] = int((self_layer_weights(pipe.self_layers, pipe.self_rows)
                                                              != 0).sum())
            row["with_propagation"] = _ratio({kk: cap[kk] + prop[kk] for kk in prop}, res["plain"])
        by_mode[m] = row
    per_layer = {n: round(v / b) for n, v in factor_bytes.items()}  # bytes per collect timestep (row)
    return {"batch": b, "cross_layers_hooked": len(pipe.cross_names), "self_layers_hooked": len(pipe.self_names),
            "layers_total": len(backbone.attention_layers()), "self_maps": modes[0],
            **{f"{k}_s": _rounded(v) for k, v in res.items()},
            "cross_only_overhead": _ratio(res["cross_only"], res["plain"]),
            "pipeline_capture_overhead": by_mode[modes[0]]["forward"],
            "by_self_maps": by_mode,
            "fused_factor_bytes_per_collect_step": {
                "per_layer": per_layer, "all_layers": sum(per_layer.values()),
                "all_layers_mib": round(sum(per_layer.values()) / 2**20, 2),
                "note": "q/k as computed (float32 here); self_factors.dtype=bfloat16/float16 halves it"}}


def capture_summary(capture: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's capture against its target: the forward alone, and with the propagation that
    the fused path defers to after the forward (where its attention products happen)."""
    main = capture["by_self_maps"][capture["self_maps"]]
    forward = main["forward"]["wall"]
    return {"pipeline_capture_forward": forward, "pipeline_capture_forward_runs": main.get("forward_runs"),
            "pipeline_capture_target": PIPELINE_CAPTURE_TARGET,
            "pipeline_capture_forward_ok": forward <= PIPELINE_CAPTURE_TARGET,
            "pipeline_capture_with_propagation": main.get("with_propagation", main["forward"])["wall"]}


def measure_propagation(pipe: AlignmentPipeline, classes: int = 2, repeats: int = 3) -> dict[str, Any] | None:
    """Self-attention propagation: forming ``K = K_1 K_0`` then ``K a`` (the first implementation,
    kept in ``aggregate_self``) vs applying the steps to the maps (what the pipeline does now)."""
    if not pipe.self_rows:
        return None
    gen = torch.Generator().manual_seed(0)
    device = pipe.backbone.device  # where the pipeline aggregates: the maps stay on the device
    maps = {l.name: torch.softmax(torch.rand(l.grid[0] * l.grid[1], l.grid[0] * l.grid[1], generator=gen), -1)
            .to(device) for l in pipe.self_layers if l.name in pipe.self_names}
    heat = torch.rand(classes, *pipe.out_grid, generator=gen).to(device)

    def product() -> None:
        propagate(aggregate_self(maps, pipe.self_layers, pipe.self_rows, pipe.out_grid), heat)
        _sync(pipe.backbone)

    def steps() -> None:
        propagate(self_steps(maps, pipe.self_layers, pipe.self_rows, pipe.out_grid), heat)
        _sync(pipe.backbone)

    steps()  # warm-up (kernel selection on a GPU)
    res = interleaved({"product": product, "steps": steps}, repeats)
    return {"grid": list(pipe.out_grid), "self_layers": len(maps), "steps": len(pipe.self_rows),
            **{f"{k}_s": _rounded(v) for k, v in res.items()},
            "speedup": _ratio(res["product"], res["steps"])}


def _status_mib(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` (Linux), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (``echo 5 > /proc/self/clear_refs``), so the peak
    read afterwards is the pipeline's own, not the import/load transient's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def probe_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Run in a fresh process: load, run the pipeline once, report peak RSS (MiB)."""
    backbone, extractor, _ = build_backbone(args.backbone, workdir=args.workdir)
    pipe = make_pipeline(backbone, extractor, args)
    image = bench_image(backbone)
    gc.collect()
    loaded = _status_mib("VmRSS")
    reset = _reset_peak() and loaded is not None
    if not reset:  # no /proc: the lifetime peak from getrusage (includes loading)
        loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pipe.run(image, CLASS_NAMES[:args.classes[0]], VARIANTS, key="probe")
    peak = _status_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"collect_steps": args.collect_steps, "classes": args.classes[0], "elbo_steps": args.elbo_steps,
            "self_maps": args.self_maps[0], "factor_dtype": args.factor_dtype, "factor_max_mib": args.factor_max_mib,
            "rss_after_load_mib": round(loaded, 1), "peak_rss_mib": round(peak, 1),
            "pipeline_increment_mib": round(peak - loaded, 1),
            "peak_source": "VmHWM after clear_refs" if reset else "getrusage ru_maxrss (includes loading)"}


def measure_memory(args: argparse.Namespace) -> dict[str, Any]:
    """(d): fresh subprocesses over collect-step counts and class counts."""
    # one per-call batch for every probe: memory may then only grow with what is kept across calls
    batch = min(args.collect_batch, min(args.memory_collect))

    done: dict[tuple[int, int, str], dict[str, Any]] = {}

    def child(collect_steps: int, classes: int, mode: str) -> dict[str, Any]:
        # a (collect steps, classes) point in both the by-steps and the by-classes row is probed once
        if (collect_steps, classes, mode) not in done:
            done[collect_steps, classes, mode] = probe(collect_steps, classes, mode)
        return done[collect_steps, classes, mode]

    def probe(collect_steps: int, classes: int, mode: str) -> dict[str, Any]:
        cmd = [sys.executable, __file__, "--probe", "--backbone", args.backbone, "--workdir", str(args.workdir),
               "--collect-steps", str(collect_steps), "--classes", str(classes),
               "--elbo-steps", str(args.elbo_steps), "--collect-batch", str(batch),
               "--elbo-batch", str(args.elbo_batch), "--self-maps", mode]
        if args.factor_dtype:
            cmd += ["--factor-dtype", args.factor_dtype]
        if args.factor_max_mib:
            cmd += ["--factor-max-mib", args.factor_max_mib]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe failed: {proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    k0 = min(args.memory_classes)

    def spread(rows: list[dict[str, Any]]) -> float:
        peaks = [r["peak_rss_mib"] for r in rows]
        return round(max(peaks) - min(peaks), 1)

    def per_step(rows: list[dict[str, Any]], key: str = "peak_rss_mib") -> float | None:
        """Growth of ``key`` from the fewest to the most collect steps, MiB per step."""
        a, b = min(rows, key=lambda r: r["collect_steps"]), max(rows, key=lambda r: r["collect_steps"])
        return None if a is b else round((b[key] - a[key]) / (b["collect_steps"] - a["collect_steps"]), 2)

    modes = {}
    for mode in args.self_maps:
        by_collect = [child(n, k0, mode) for n in args.memory_collect]
        by_classes = [child(args.memory_collect[0], k, mode) for k in args.memory_classes]
        modes[mode] = {"by_collect_steps": by_collect, "by_classes": by_classes,
                       "peak_spread_over_collect_steps_mib": spread(by_collect),
                       "peak_spread_over_classes_mib": spread(by_classes),
                       "peak_growth_mib_per_collect_step": per_step(by_collect),
                       # the increment over the loaded process is the steadier number: RSS after
                       # loading varies by tens of MiB between fresh processes
                       "increment_growth_mib_per_collect_step": per_step(by_collect, "pipeline_increment_mib"),
                       "peak_max_mib": max(r["peak_rss_mib"] for r in by_collect + by_classes)}
    main_mode = modes[args.self_maps[0]]
    return {"collect_batch": batch, "self_maps": args.self_maps[0], **main_mode, "by_self_maps": modes}


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="toy", help="toy | tiny-random | sd15-config | a registry backbone")
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--collect-steps", type=int, default=10)
    parser.add_argument("--elbo-steps", type=int, default=20)
    parser.add_argument("--collect-batch", type=int, default=10)
    parser.add_argument("--elbo-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--memory-collect", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--memory-classes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--capture-repeats", type=int, default=5, help="timed runs of the capture-overhead forward")
    parser.add_argument("--self-maps", nargs="+", choices=["fused", "explicit"], default=["fused", "explicit"],
                        help="self-map modes measured side by side; the first is the pipeline's")
    parser.add_argument("--factor-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="storage dtype of the fused q/k factors (default: as computed)")
    parser.add_argument("--factor-max-mib", default=None,
                        help="self_factors.max_mib of the fused path: MiB, 'auto', 'explicit' or 'unbounded' (default: the pipeline's, auto)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="only the memory probes (d)")
    parser.add_argument("--capture-only", action="store_true",
                        help="only the capture overhead (c), --capture-repeats interleaved runs at --collect-batch")
    parser.add_argument("--note", default=None, help="a remark stored with the result (e.g. what else ran)")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--elbo-preset", default="fast", choices=[*ELBO_PRESETS, "none"],
                        help="also time ours with this ELBO preset, core/elbo_presets.py (none: skip)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up image (large models)")
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks the script end to end")
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe_memory(args)))
        return 0
    if args.smoke:
        args.classes, args.collect_steps, args.elbo_steps = [2, 4], 2, 2
        args.collect_batch, args.elbo_batch, args.repeats = 2, 4, 1
        args.memory_collect, args.memory_classes = [2, 4], [2, 4]
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="t2ialign-speed-"))

    if args.memory_only:
        memory = measure_memory(args)
        report = {"benchmark": "speed", "backbone": args.backbone, "smoke": args.smoke, "memory_only": True,
                  "command": command_line("speed.py", argv), "machine": machine(),
                  "setup": {"collect_batch": args.collect_batch, "elbo_steps": args.elbo_steps,
                            "elbo_batch": args.elbo_batch, "self_maps": args.self_maps,
                            "factor_dtype": args.factor_dtype, "factor_max_mib": args.factor_max_mib},
                  "memory": memory, **({"note": args.note} if args.note else {})}
        write_result(args.out or RESULTS / f"speed_{args.backbone}_memory.json", report)
        return 0

    torch.manual_seed(0)
    tic = time.perf_counter()
    backbone, extractor, _ = build_backbone(args.backbone, workdir=args.workdir)
    load_s = time.perf_counter() - tic
    pipes = {mode: make_pipeline(backbone, extractor, args, mode) for mode in args.self_maps}
    pipe = pipes[args.self_maps[0]]
    image = bench_image(backbone)
    if args.capture_only:
        capture = measure_capture(backbone, pipe, image, extractor, args.capture_repeats, args.self_maps)
        report = {"benchmark": "speed", "backbone": args.backbone, "smoke": args.smoke, "capture_only": True,
                  "command": command_line("speed.py", argv), "machine": machine(),
                  "setup": {"collect_steps": args.collect_steps, "collect_batch": args.collect_batch,
                            "capture_repeats": args.capture_repeats, "image_size": backbone.image_size,
                            "self_maps": args.self_maps, "factor_dtype": args.factor_dtype},
                  "capture": capture, "summary": capture_summary(capture),
                  **({"note": args.note} if args.note else {})}
        write_result(args.out or RESULTS / f"speed_{args.backbone}_capture.json", report)
        return 0
    if not args.no_warmup:
        for p in pipes.values():
            p.run(image, CLASS_NAMES[:2], VARIANTS, key="warm-up")
    image_size = backbone.image_size

    preset = None if args.elbo_preset == "none" else make_pipeline(backbone, extractor, args, preset=args.elbo_preset)
    schedules = measure_schedules(backbone, pipes, image, args.classes, args.repeats, not args.no_reference, preset)
    capture = measure_capture(backbone, pipe, image, extractor, args.capture_repeats, args.self_maps)
    propagation = measure_propagation(pipe)
    del backbone, extractor, pipe, pipes, preset
    gc.collect()
    memory = None if args.no_memory else measure_memory(args)

    limit = [r["limit_ratio"]["wall"] for r in schedules]
    limit_k2 = next((r["limit_ratio"]["wall"] for r in schedules if r["classes"] == 2), None)
    ref = [r["reference_over_pipeline"]["wall"] for r in schedules if "reference_over_pipeline" in r]
    report = {
        "benchmark": "speed",
        "backbone": args.backbone,
        "smoke": args.smoke,
        "command": command_line("speed.py", argv),
        "machine": machine(),
        "setup": {"collect_steps": args.collect_steps, "elbo_steps": args.elbo_steps,
                  "collect_batch": args.collect_batch, "elbo_batch": args.elbo_batch,
                  "repeats": args.repeats, "image_size": image_size, "load_s": round(load_s, 2),
                  "variants": [v.name for v in VARIANTS], "self_maps": args.self_maps,
                  "factor_dtype": args.factor_dtype},
        "schedules": schedules,
        "capture": capture,
        "propagation": propagation,
        "memory": memory,
        "summary": {
            "limit_ratio_max": max(limit), "limit_target": LIMIT_TARGET,
            "limit_ratio_k2": limit_k2,
            # the target is set at K = 2 (the fewest classes, where fixed costs weigh most)
            "limit_ok": (limit_k2 if limit_k2 is not None else max(limit)) <= LIMIT_TARGET,
            "reference_speedup_min": min(ref) if ref else None, "reference_target": 3.0,
            "reference_ok": (min(ref) >= 3.0) if ref else None,
            "elbo_preset": None if args.elbo_preset == "none" else
            {"name": args.elbo_preset, **ELBO_PRESETS[args.elbo_preset],
             "reference_speedup_min": min((r["reference_over_preset"]["wall"] for r in schedules
                                           if "reference_over_preset" in r), default=None)},
            "capture_overhead": capture["cross_only_overhead"]["wall"], "capture_target": 1.10,
            "capture_ok": capture["cross_only_overhead"]["wall"] <= 1.10,
            **capture_summary(capture),
            "pipeline_capture_overhead": {m: v.get("with_propagation", v["forward"])["wall"]
                                          for m, v in capture["by_self_maps"].items()},
            **{f"limit_ratio_max_{m}": max(r[f"limit_ratio_{m}"]["wall"] for r in schedules)
               for m in args.self_maps[1:]},
            "memory_flat_in_collect_steps": None if memory is None else memory["peak_spread_over_collect_steps_mib"],
        },
        **({"note": args.note} if args.note else {}),
    }
    out = args.out or RESULTS / f"speed_{args.backbone}{'_smoke' if args.smoke else ''}.json"
    write_result(out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
