"""Does a CPU denoiser forward get faster with bfloat16, channels-last or torch.compile?

One UNet forward (the pipeline's unit of work) timed in each variant, interleaved, median of
``--repeats`` runs, on the toy UNet (ELBO batch 8 at 16x16 latents) and on a random-weight
SD1.5-config UNet (batch 2 at 64x64 latents). bfloat16 also reports how far the prediction moves
from float32 (relative L2), which is what decides whether the ELBO differences survive it; the
quality check of a candidate is a segmentation run with ``dtype=bfloat16``.

    python benchmarks/cpu_precision.py
    python benchmarks/cpu_precision.py --models toy --no-compile
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, machine, sd15_config_backbone, write_result  # noqa: E402


def _time(fn: Callable[[], Any]) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def _setup(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    if name == "toy":
        from t2ialign.core.host import Host

        bb = Host().backbone("toy")
        batch, size = 8, bb.latent_size
    else:
        bb = sd15_config_backbone()
        batch, size = 2, 64
    g = torch.Generator().manual_seed(0)
    cond = bb.encode_text(["a photo of a red circle and a blue star"] * batch)
    inputs = {"sample": torch.randn(batch, 4, size, size, generator=g), "timestep": torch.full((batch,), 300.0),
              "encoder_hidden_states": cond.embeds}
    return bb.unet.float().eval(), inputs


def measure(name: str, repeats: int, compile_: bool) -> dict[str, Any]:
    unet, inputs = _setup(name)
    variants: dict[str, Callable[[], torch.Tensor]] = {}
    ref = unet(**inputs).sample

    variants["float32"] = lambda: unet(**inputs).sample
    cl = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    cl_inputs = dict(inputs, sample=inputs["sample"].contiguous(memory_format=torch.channels_last))
    variants["float32 channels_last"] = lambda: cl(**cl_inputs).sample
    bf = copy.deepcopy(unet).to(torch.bfloat16)
    bf_inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v for k, v in inputs.items()}
    variants["bfloat16"] = lambda: bf(**bf_inputs).sample.float()
    if compile_:
        comp = torch.compile(copy.deepcopy(unet))
        variants["float32 torch.compile"] = lambda: comp(**inputs).sample
    out: dict[str, Any] = {"model": name, "batch": int(inputs["sample"].shape[0]),
                           "latent": list(inputs["sample"].shape[2:]), "variants": {}}
    with torch.no_grad():
        for label, fn in variants.items():
            tic = time.perf_counter()
            pred = fn()  # warm-up (and compilation)
            first = time.perf_counter() - tic
            rel = float((pred.float() - ref).norm() / ref.norm())
            out["variants"][label] = {"first_call_s": round(first, 3), "rel_l2_vs_float32": rel}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats):
            for label, fn in variants.items():
                times[label].append(_time(fn))
    base = statistics.median(times["float32"])
    for label in variants:
        med = statistics.median(times[label])
        out["variants"][label].update({"median_s": round(med, 4), "speedup_vs_float32": round(base / med, 3)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["toy", "sd15-config"], choices=["toy", "sd15-config"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    report = {"benchmark": "cpu_precision", "command": command_line("cpu_precision.py", argv), "machine": machine(),
              "results": [measure(m, args.repeats, not args.no_compile) for m in args.models]}
    write_result(RESULTS / "cpu_precision.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
