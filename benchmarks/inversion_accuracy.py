"""Reconstruction under guidance: plain DDIM inversion vs Null-text inversion on the toy model.

For toy scenes of a split: encode, invert under the caption, sample the caption back with CFG
``guidance`` from the inverted noise, decode, and compare with the decode of the image's own
latent (PSNR, dB) -- the error of the inversion alone; the toy VAE's own reconstruction PSNR
against the scene is printed next to it, because no latent editor can beat it. Plain DDIM is
the guidance-1 inversion sampled under guidance (the failure case null-text inversion fixes).

    python benchmarks/inversion_accuracy.py                      # 8 val scenes, 50 steps, guidance 7.5
    python benchmarks/inversion_accuracy.py --n 4 --steps 20 --lr 0.01 0.05

Prints JSON and writes ``benchmarks/results/inversion_accuracy.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, machine, write_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="scenes")
    parser.add_argument("--split", default="val")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--out", type=Path, default=RESULTS / "inversion_accuracy.json")
    args = parser.parse_args(argv)

    from skimage.metrics import peak_signal_noise_ratio as psnr

    from t2ialign.core.host import Host
    from t2ialign.core.inversion import ddim_invert, null_text_invert, reconstruct
    from t2ialign.core.sampling import to_uint8

    host = Host()
    backbone = host.backbone("toy")
    dataset = host.dataset("toy_shapes", args.split)
    rows = []
    for i in range(args.n):
        scene = dataset[i]
        x = torch.from_numpy(scene.image.astype(np.float32) / 255).permute(2, 0, 1)[None]
        decoded = to_uint8(backbone.decode_latents(backbone.encode_image(x)))[0]
        row = {"id": scene.id, "vae_psnr_vs_scene": psnr(scene.image, decoded, data_range=255)}
        tic = time.perf_counter()
        plain = ddim_invert(backbone, scene.image, scene.prompt, steps=args.steps, guidance=1.0)
        plain.guidance = args.guidance
        row["ddim_psnr"] = psnr(decoded, reconstruct(backbone, plain)[0], data_range=255)
        row["ddim_s"] = time.perf_counter() - tic
        for lr in args.lr:
            tic = time.perf_counter()
            nti = null_text_invert(backbone, scene.image, scene.prompt, steps=args.steps, guidance=args.guidance,
                                   inner_steps=args.inner_steps, lr=lr)
            row[f"null_text_lr{lr:g}_psnr"] = psnr(decoded, reconstruct(backbone, nti)[0], data_range=255)
            row[f"null_text_lr{lr:g}_iterations"] = sum(nti.iterations)
            row[f"null_text_lr{lr:g}_s"] = time.perf_counter() - tic
        rows.append(row)
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, file=sys.stderr, flush=True)
    keys = [k for k in rows[0] if k != "id"]
    report = {
        "benchmark": "inversion_accuracy", "backbone": "toy", "split": args.split, "scenes": len(rows),
        "steps": args.steps, "guidance": args.guidance, "inner_steps": args.inner_steps,
        "reference": "PSNR (dB) against the decode of the scene's own latent",
        "mean": {k: float(np.mean([r[k] for r in rows])) for k in keys},
        "min": {k: float(np.min([r[k] for r in rows])) for k in keys},
        "rows": rows, "command": command_line("benchmarks/inversion_accuracy.py", argv), "machine": machine(),
    }
    write_result(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
