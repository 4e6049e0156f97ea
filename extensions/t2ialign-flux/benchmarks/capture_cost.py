"""Cost of ``flux_attention`` capture relative to a plain FLUX transformer forward; prints JSON.

A ``FluxTransformer2DModel`` with FLUX.1's real widths (24 heads of 128, T5 width 4096, packed
64-channel latents) but only a few blocks is randomly initialised, and one forward is timed
without capture, with cross-only capture (two token columns: a class word) and with cross + self
capture (what the segmentation pipeline needs), interleaved so that load from other processes
affects all three alike. Per-layer cost does not depend on the number of blocks, so the ratios
carry over to the full 19 + 38 block model at the same resolution.

    python benchmarks/capture_cost.py --image-size 512 --double 1 --single 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch

from t2ialign.core.protocols import LayerInfo
from t2ialign_flux.extractor import FluxAttentionExtractor
from t2ialign_flux.flux import image_position_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--t5-length", type=int, default=512)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    from diffusers import FluxTransformer2DModel

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(num_layers=args.double, num_single_layers=args.single, guidance_embeds=True)
    model = model.to(dev, dtype).eval().requires_grad_(False)
    side = args.image_size // 16
    n_img = side * side
    names = [f"transformer_blocks.{i}.attn" for i in range(args.double)]
    names += [f"single_transformer_blocks.{i}.attn" for i in range(args.single)]
    backbone = SimpleNamespace(
        name="flux-shaped", denoiser=model, device=dev, max_tokens=args.t5_length,
        attention_layers=lambda: [LayerInfo(n, "joint", (side, side), 0, d, "block") for d, n in enumerate(names)])
    inputs = dict(
        hidden_states=torch.randn(args.batch, n_img, 64, device=dev, dtype=dtype),
        encoder_hidden_states=torch.randn(args.batch, args.t5_length, 4096, device=dev, dtype=dtype),
        pooled_projections=torch.randn(args.batch, 768, device=dev, dtype=dtype),
        timestep=torch.full((args.batch,), 0.5, device=dev, dtype=dtype),
        guidance=torch.full((args.batch,), 3.5, device=dev), img_ids=image_position_ids(side, side, dev, dtype),
        txt_ids=torch.zeros(args.t5_length, 3, device=dev, dtype=dtype), return_dict=False)
    extractor = FluxAttentionExtractor(backbone)

    def run(mode: str) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        with torch.no_grad():
            if mode == "plain":
                model(**inputs)
            else:
                with extractor.capture(token_indices=[3, 4], self_layers=None if mode == "cross+self" else []):
                    model(**inputs)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - tic

    modes = ("plain", "cross", "cross+self")
    for mode in modes:  # warm-up
        run(mode)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            times[mode].append(run(mode))
    med = {m: statistics.median(v) for m, v in times.items()}
    print(json.dumps({
        "config": vars(args), "image_tokens": n_img, "layers": len(names),
        "median_seconds": med,
        "ratio_to_plain": {m: med[m] / med["plain"] for m in modes},
        "capture_seconds_per_layer": {m: (med[m] - med["plain"]) / len(names) for m in modes[1:]},
        "torch_threads": torch.get_num_threads(),
    }, indent=2))


if __name__ == "__main__":
    main()
