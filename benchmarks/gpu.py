"""GPU variant of the speed benchmark: SD1.5-size and SDXL-size random-weight models in fp16.

The same measurements as ``speed.py`` (limit ratio, reference schedule, capture overhead, memory),
on one CUDA device, in about 5 minutes on an H100-class GPU:

* models: a random-weight SD1.5 UNet (64x64 latents, 512 px) and a random-weight SDXL-base UNet
  (128x128 latents, 1024 px) with text encoders of the real sizes, built directly on the GPU and
  cast to fp16 (the VAE is a few-channel one with 8x downsampling, as in ``speed.py``);
* timing: every timed function ends with ``torch.cuda.synchronize()``, the clock starts after the
  previous one synchronised, one untimed warm-up image per model (kernel selection, allocator);
* memory: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, per run, vs the
  number of collect timesteps and of classes;
* profile (``--no-profile`` skips it): one pipeline run under ``torch.profiler`` with the ops that
  take most host and device time and the number of stream syncs and host<->device copies, which
  is how the per-layer copy and the float32 logits GEMM were found (README Performance).

The results JSON is rewritten after each model, so a run cut off by ``--budget-s`` or a
timeout keeps what it measured.

Without a CUDA device it prints one JSON line saying why and exits 0 (nothing is written).
``--budget-s`` stops starting new measurements once that much time has passed.

    python benchmarks/gpu.py                 # writes benchmarks/results/gpu.json
    python benchmarks/gpu.py --device cpu --models tiny-random --no-profile --out /tmp/gpu.json  # checks the script

Both self-map modes are measured side by side (``--self-maps``, the first is the pipeline's), the
capture with the fused path's deferred propagation, and ours with ``elbo.preset=fast`` next to the
default schedule, as in ``speed.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    SD15_SCHEDULER,
    SD15_TEXT_CONFIG,
    SDXL_UNET_CONFIG,
    command_line,
    machine,
    sd15_config_backbone,
    write_result,
)


def sdxl_config_backbone(device: str, dtype: torch.dtype, seed: int = 0):
    """A :class:`StableDiffusionXLBackbone` around random SDXL-base-size parts, built on ``device``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from t2ialign.core.clip_tokenizer import clip_tokenizer
    from t2ialign.plugins.backbones.stable_diffusion_xl import OPTIONS as SDXL_OPTIONS, StableDiffusionXLBackbone

    torch.manual_seed(seed)
    dev = torch.device(device)
    with dev:  # initialise on the GPU: seconds instead of minutes for 2.6 B parameters
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=4, sample_size=1024, scaling_factor=0.13025)
    for module in (unet, text, text_2, vae):
        module.requires_grad_(False).eval()
    for module in (unet, text, text_2):
        module.to(dtype=dtype)
    return StableDiffusionXLBackbone(
        name="sdxl-config", unet=unet, vae=vae, text_encoder=text, tokenizer=clip_tokenizer(),
        text_encoder_2=text_2, tokenizer_2=clip_tokenizer(pad_token="!"),
        # SDXL-base trains on SD's scaled-linear betas 0.00085 -> 0.012 (its EulerDiscrete config)
        scheduler_config=SD15_SCHEDULER, prediction_type="epsilon", image_size=1024, device=dev, dtype=dtype,
        layer_defaults={k: SDXL_OPTIONS[k] for k in ("cross_weight", "cross_gaussian_sigma", "self_weight")},
    )


def gpu_memory(backbone: Any, extractor: Any, base_args: argparse.Namespace, collect: list[int],
               classes: list[int]) -> dict[str, Any]:
    """Peak allocated GPU memory of one pipeline run per setting (model weights excluded)."""
    from speed import VARIANTS, bench_image, make_pipeline

    from t2ialign.plugins.toy.world import CLASS_NAMES

    image = bench_image(backbone)

    def one(n_collect: int, k: int) -> dict[str, Any]:
        args = argparse.Namespace(**{**vars(base_args), "collect_steps": n_collect})
        pipe = make_pipeline(backbone, extractor, args)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        pipe.run(image, CLASS_NAMES[:k], VARIANTS, key="memory")
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"collect_steps": n_collect, "classes": k, "weights_mib": round(before / 2**20, 1),
                "peak_mib": round(peak / 2**20, 1), "pipeline_increment_mib": round((peak - before) / 2**20, 1)}

    by_collect = [one(n, min(classes)) for n in collect]
    by_classes = [one(collect[0], k) for k in classes]
    spread = lambda rows: round(max(r["peak_mib"] for r in rows) - min(r["peak_mib"] for r in rows), 1)  # noqa: E731
    return {"collect_batch": base_args.collect_batch, "by_collect_steps": by_collect, "by_classes": by_classes,
            "peak_spread_over_collect_steps_mib": spread(by_collect),
            "peak_spread_over_classes_mib": spread(by_classes)}


def profile_pipeline(pipe: Any, image: Any, k: int, top: int = 12) -> dict[str, Any]:
    """One pipeline run under ``torch.profiler``: the ops that take most host and device time, and
    how many host<->device copies and stream synchronisations the run makes (each sync stops the
    CPU from queueing work ahead of the GPU)."""
    from speed import VARIANTS

    from t2ialign.plugins.toy.world import CLASS_NAMES

    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        pipe.run(image, CLASS_NAMES[:k], VARIANTS, key="profile")
        torch.cuda.synchronize()
    events = prof.key_averages()

    def rows(attr: str) -> list[dict[str, Any]]:
        ranked = sorted(events, key=lambda e: getattr(e, attr, 0) or 0, reverse=True)[:top]
        return [{"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 2),
                 "self_device_ms": round((getattr(e, "self_device_time_total", 0) or 0) / 1000, 2)} for e in ranked]

    count = lambda pred: sum(e.count for e in events if pred(e.key))  # noqa: E731
    return {"classes": k, "top_host_self": rows("self_cpu_time_total"), "top_device_self": rows("self_device_time_total"),
            "stream_syncs": count(lambda n: "Synchronize" in n),
            "memcpy_calls": count(lambda n: n.startswith("cudaMemcpy")),
            "kernel_launches": count(lambda n: n in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"))}


def build_model(name: str, device: str) -> Any:
    """The benchmarked backbone: the real-size random models in float16 on a GPU, or ``tiny-random``
    (float32, the checks of this script without a GPU)."""
    if name == "tiny-random":
        from _common import build_backbone

        return build_backbone(name, device=device)[0]
    dtype = torch.float16
    return sd15_config_backbone(device, dtype) if name == "sd15-config" else sdxl_config_backbone(device, dtype)


def measure_model(name: str, args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """Schedules (limit ratio, reference / ours, with the ELBO preset), capture overhead per
    self-map mode with the deferred propagation, the profile and peak memory of one model."""
    from speed import (
        VARIANTS,
        _sync,
        bench_image,
        capture_summary,
        make_pipeline,
        measure_capture,
        measure_propagation,
        measure_schedules,
    )

    from t2ialign.plugins.toy.world import CLASS_NAMES
    from t2ialign.plugins.extractors.unet import UNetAttentionExtractor

    tic = time.perf_counter()
    on_gpu = torch.device(args.device).type == "cuda"
    backbone = build_model(name, args.device)
    _sync(backbone)
    extractor = UNetAttentionExtractor(backbone)
    run_args = argparse.Namespace(collect_steps=args.collect_steps, elbo_steps=args.elbo_steps,
                                  collect_batch=args.collect_batch, elbo_batch=args.elbo_batch,
                                  self_maps=args.self_maps, factor_dtype=args.factor_dtype, factor_max_mib=None)
    pipes = {mode: make_pipeline(backbone, extractor, run_args, mode) for mode in args.self_maps}
    pipe = pipes[args.self_maps[0]]
    preset = None if args.elbo_preset == "none" else make_pipeline(backbone, extractor, run_args,
                                                                   preset=args.elbo_preset)
    image = bench_image(backbone)
    for p in pipes.values():
        p.run(image, CLASS_NAMES[:2], VARIANTS, key="warm-up")
    _sync(backbone)
    out: dict[str, Any] = {"backbone": name, "dtype": str(backbone.dtype).removeprefix("torch."),
                           "image_size": backbone.image_size, "self_maps": args.self_maps,
                           "load_s": round(time.perf_counter() - tic, 2)}
    repeats = args.repeats if name != "sdxl-config" else max(1, args.repeats - 1)
    schedules = []
    for k in args.classes:
        if time.perf_counter() > deadline:
            out["stopped"] = f"time budget reached before classes={k}"
            break
        schedules += measure_schedules(backbone, pipes, image, [k], repeats, True, preset)
    out["schedules"] = schedules
    if time.perf_counter() < deadline:
        out["capture"] = measure_capture(backbone, pipe, image, extractor, args.capture_repeats, args.self_maps)
        out["capture_summary"] = capture_summary(out["capture"])
        out["propagation"] = measure_propagation(pipe)
    if args.profile and time.perf_counter() < deadline:
        out["profile"] = profile_pipeline(pipe, image, min(args.classes))
    if time.perf_counter() < deadline and on_gpu:  # peak GPU memory needs CUDA
        mem = {mode: gpu_memory(backbone, extractor, argparse.Namespace(**{**vars(run_args), "self_maps": [mode]}),
                                args.memory_collect, args.memory_classes) for mode in args.self_maps}
        out["memory"] = {**mem[args.self_maps[0]], "self_maps": args.self_maps[0], "by_self_maps": mem}
    del backbone, extractor, pipe, pipes, preset
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sd15-config", "sdxl-config"],
                        choices=["sd15-config", "sdxl-config", "tiny-random"])
    parser.add_argument("--device", default="cuda",
                        help="cuda (the benchmark); cpu only checks the script on tiny-random")
    parser.add_argument("--self-maps", nargs="+", choices=["fused", "explicit"], default=["fused", "explicit"],
                        help="self-map modes measured side by side; the first is the pipeline's")
    parser.add_argument("--factor-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="storage dtype of the fused q/k factors (default: as computed)")
    parser.add_argument("--elbo-preset", default="fast", help="also time ours with this ELBO preset (none: skip)")
    parser.add_argument("--capture-repeats", type=int, default=5)
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--collect-steps", type=int, default=10)
    parser.add_argument("--elbo-steps", type=int, default=20)
    parser.add_argument("--collect-batch", type=int, default=10)
    parser.add_argument("--elbo-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-collect", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--memory-classes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="profile one pipeline run per model (torch.profiler): top ops, syncs, copies")
    parser.add_argument("--budget-s", type=float, default=270.0, help="start no new measurement after this")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu", "skipped": "no CUDA device (torch.cuda.is_available() is False)",
                          "torch": torch.__version__}))
        return 0
    start = time.perf_counter()
    deadline = start + args.budget_s
    models = []
    for name in args.models:
        if time.perf_counter() > deadline:
            models.append({"backbone": name, "stopped": "time budget reached before this model"})
            continue
        models.append(measure_model(name, args, deadline))
        print(json.dumps({"done": name, "elapsed_s": round(time.perf_counter() - start, 1)}), file=sys.stderr)
        write_result(args.out, report(models, args, argv, start, partial=True))  # a cut-off run keeps this
    write_result(args.out, report(models, args, argv, start, partial=False))
    return 0


def report(models: list[dict[str, Any]], args: argparse.Namespace, argv: list[str] | None, start: float,
           partial: bool) -> dict[str, Any]:
    """The JSON written to ``--out`` (also after each model, marked ``partial``)."""
    summary = {}
    for m in models:
        rows = m.get("schedules", [])
        summary[m["backbone"]] = {
            "limit_ratio_by_classes": {r["classes"]: r["limit_ratio"]["wall"] for r in rows},
            "reference_over_ours_by_classes": {r["classes"]: r["reference_over_pipeline"]["wall"] for r in rows},
            "capture_overhead": m.get("capture", {}).get("cross_only_overhead", {}).get("wall"),
            **m.get("capture_summary", {}),
            "memory_spread_over_collect_steps_mib": m.get("memory", {}).get("peak_spread_over_collect_steps_mib"),
        }
    out = {"benchmark": "gpu", "command": command_line("gpu.py", argv), "machine": machine(),
           "setup": {k: v for k, v in vars(args).items() if k != "out"},
           "models": models, "summary": summary, "wall_s": round(time.perf_counter() - start, 1)}
    out["setup"]["out"] = str(args.out)
    if partial:
        out["partial"] = "written after each model; the run may have been cut off before the rest"
    return out


if __name__ == "__main__":
    raise SystemExit(main())
