"""Where a backbone's cross-attention mass goes: start token, each prompt token, padding.

A diagnostic for the toy model (or any registry backbone): for val images of ``toy_shapes``
with the segmentation task's collect prompt (``"a photo of circle, star"``), noised at the
collect timesteps, it captures every cross-attention layer over all 77 text positions and
reports per layer the mean attention on the start token, on each class token, on the other
prompt tokens and on the padding, next to the uniform level 1/77. It also reports how different
the class maps of one image are from each other (mean |A_i - A_j| of min-max-normalised
maps): attention that cannot tell the classes apart gives near-identical maps, and no threshold
or calibration can then separate the objects. Localisation does not depend on how much mass a
word gets: per layer it also reports which share of a class word's attention (over pixels) falls
inside that class's ground-truth mask, next to the mask's share of the image (what attention
spread evenly over the pixels would give).

    python benchmarks/toy_attention_mass.py --limit 20
    python benchmarks/toy_attention_mass.py --model runs/toy/pipeline --tag run3000   # an unexported run
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, machine, write_result  # noqa: E402

from t2ialign.core.calibration import minmax  # noqa: E402
from t2ialign.core.host import Host  # noqa: E402
from t2ialign.core.pipeline import image_to_tensor  # noqa: E402
from t2ialign.plugins.toy.world import CLASS_NAMES  # noqa: E402

TIMESTEPS = (20, 100, 200)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="toy")
    parser.add_argument("--model", default=None, help="load this pipeline folder as the backbone instead")
    parser.add_argument("--tag", default="", help="suffix of the result file name (with --model)")
    parser.add_argument("--limit", type=int, default=20, help="val images")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    registry = []
    if args.model:
        reg = Path(tempfile.mkdtemp(prefix="t2ialign-mass-")) / "registry.yaml"
        reg.write_text(f"backbones:\n  {args.backbone}:\n    model: {Path(args.model).resolve()}\n")
        registry = [reg]
    host = Host(registry_files=registry)
    bb = host.backbone(args.backbone)
    ex = host.extractor(bb)
    data = host.dataset("toy_shapes", split="val")
    cross = [l for l in bb.attention_layers() if l.kind == "cross"]
    sums = {l.name: np.zeros(bb.max_tokens) for l in cross}
    roles = {l.name: {"start": [], "class": [], "other_prompt": [], "padding": [], "inside": [], "area": []}
             for l in cross}
    spread = []
    for i in range(min(args.limit, len(data))):
        sample = data[i]
        names = [CLASS_NAMES[c - 1] for c in sample.classes if c > 0]
        prompt = "a photo of " + ", ".join(names)
        spans = [bb.token_spans(prompt, n) for n in names]
        # BOS + prompt tokens + EOS; padding starts right after
        n_prompt = len(bb.tokenizer(prompt).input_ids)
        cond = bb.encode_text([prompt])
        z0 = bb.encode_image(image_to_tensor(sample.image))
        with ex.capture(cross_layers=[l.name for l in cross], self_layers=[]) as store:
            for t in TIMESTEPS:
                tt = torch.tensor([float(t)])
                bb.predict(bb.add_noise(z0, tt, torch.randn_like(z0)), tt, cond)
        class_pos = [p for s in spans for p in s]
        for layer in cross:
            m = store.cross[layer.name][0].mean(0).double().numpy()  # (77,) mean over pixels
            sums[layer.name] += m
            r = roles[layer.name]
            r["start"].append(m[0])
            r["class"].append(float(np.mean(m[class_pos])))
            other = [p for p in range(1, n_prompt) if p not in class_pos]
            r["other_prompt"].append(float(np.mean(m[other])) if other else float("nan"))
            r["padding"].append(float(m[n_prompt:].sum()))
            probs = store.cross[layer.name][0].double()  # (pixels, 77)
            side = int(round(probs.shape[0] ** 0.5))
            for cid, span in zip([c for c in sample.classes if c > 0], spans):
                mask = torch.from_numpy(sample.mask == cid).double()[None, None]
                frac = torch.nn.functional.adaptive_avg_pool2d(mask, side).flatten()
                word = probs[:, span].mean(-1)
                r["inside"].append(float((word * frac).sum() / word.sum()))
                r["area"].append(float(frac.mean()))
        if len(spans) >= 2:
            last = cross[-1].name
            maps = [minmax(store.cross[last][0][:, s].mean(-1)) for s in spans]
            spread.append(float(np.mean([(a - b).abs().mean().item() for a, b in itertools.combinations(maps, 2)])))
    layers = {name: {"start": float(np.mean(r["start"])), "per_class_token": float(np.mean(r["class"])),
                     "per_other_prompt_token": float(np.nanmean(r["other_prompt"])),
                     "padding_total": float(np.mean(r["padding"])),
                     "class_mass_inside_own_mask": float(np.mean(r["inside"])),
                     "own_mask_share_of_image": float(np.mean(r["area"]))} for name, r in roles.items()}
    report = {"benchmark": "toy_attention_mass", "backbone": args.backbone, "model": args.model,
              "images": min(args.limit, len(data)), "timesteps": list(TIMESTEPS), "uniform_level": 1 / bb.max_tokens,
              "command": command_line("toy_attention_mass.py", argv), "machine": machine(), "layers": layers,
              "class_map_difference_last_layer": {"mean_abs_pairwise": float(np.mean(spread)) if spread else None,
                                                  "images": len(spread)}}
    suffix = f"_{args.tag}" if args.tag else ""
    write_result(args.out or RESULTS / f"toy_attention_mass{suffix}.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
