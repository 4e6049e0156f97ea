"""How many colour edits a toy model can carry out at all: the true object as blend mask.

The editing task's own numbers mix two things: the blend mask (heatmaps -> threshold -> mask) and
whether the model, given a mask, repaints the object in the new colour. This script takes the
mask out of the question: every pair's blend mask is the edited object's *ground-truth* mask
(max-pooled to the latent grid, dilated by one cell, as the task does with its own masks), so the
rate it reports is the ceiling any heatmap-based mask can reach with those editor settings. It is
how the editor defaults (guidance, ``blend.mask_noise``) and the toy training recipe were chosen,
on ``val`` pairs only (docs/editing.md, docs/toy.md).

    python benchmarks/edit_capacity.py --split val --n 41
    python benchmarks/edit_capacity.py --model runs/toy6/pipeline --settings '{"g5": {}}'

``--settings`` maps a name to editing-config overrides (dotted keys as on the command line, e.g.
``{"g10_mn1": {"guidance": 10, "blend.mask_noise": 1}}``); the default compares the old and the
new editor defaults. Pairs: ``toy_edit_pairs`` of the split (seed 4307, the editing task's), colour
edits only. Writes ``benchmarks/results/edit_capacity_<split>.json`` (per pair and setting).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, command_line, machine, write_result  # noqa: E402
from t2ialign.core.config import resolve_config  # noqa: E402
from t2ialign.core.host import Host  # noqa: E402
from t2ialign.plugins.tasks.editing.editor import mask_from_region  # noqa: E402
from t2ialign.plugins.tasks.editing.measurements import colour_verdicts  # noqa: E402
from t2ialign.plugins.tasks.editing.pairs import toy_edit_pairs  # noqa: E402
from t2ialign.plugins.tasks.editing.task import DEFAULTS, build_editor  # noqa: E402

SETTINGS = {"guidance5": {"guidance": 5.0, "blend.mask_noise": 0.0},
            "guidance10_masknoise1": {"guidance": 10.0, "blend.mask_noise": 1.0}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="val")
    parser.add_argument("--n", type=int, default=41, help="colour pairs")
    parser.add_argument("--model", default=None, help="a toy pipeline folder instead of builtin:toy")
    parser.add_argument("--settings", type=json.loads, default=SETTINGS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    registry = []
    if args.model:
        registry = [Path(tempfile.mkdtemp()) / "registry.yaml"]
        registry[0].write_text("backbones:\n  toy: {model: '%s'}\n" % Path(args.model).resolve())
    host = Host(registry_files=registry)
    backbone, oracle = host.backbone("toy"), host.metric("toy_oracle")
    pairs = toy_edit_pairs(host.dataset("toy_shapes", args.split), 2 * args.n, seed=4307, kinds=["colour", "shape"])
    pairs = [p for p in pairs if p.kind == "colour"][:args.n]
    sources: dict = {}
    results = {}
    for name, overrides in args.settings.items():
        config = resolve_config(DEFAULTS, None, [f"{k}={v}" for k, v in overrides.items()])
        editor = build_editor(config, host, backbone)
        key = (config["inversion"], config["guidance"], config["inversion_guidance"], config["steps"])
        tic, hits = time.perf_counter(), []
        for i, pair in enumerate(pairs):
            if (key, i) not in sources:  # the source trajectory depends only on the inversion settings
                sources[(key, i)] = editor.source_from_image(pair.image, pair.source)
            source = sources[(key, i)]
            mask = mask_from_region(pair.object_mask, dilate=config["blend"]["dilate"],
                                    latent_hw=tuple(source.latents.shape[-2:]), variant="oracle")
            res = editor.edit(source, pair.target, mask)
            verdict = colour_verdicts(oracle, pair, res.image, res.source_decoded, pair.image.shape[0])
            hits.append(int(verdict["colour_edited"]))
        results[name] = {"overrides": overrides, "colour_edited": float(np.mean(hits)), "hits": int(sum(hits)),
                         "pairs": len(hits), "per_pair": hits, "seconds": round(time.perf_counter() - tic, 1)}
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "per_pair"}), flush=True)
    report = {"benchmark": "edit_capacity", "split": args.split, "model": args.model or "builtin:toy",
              "command": command_line("edit_capacity.py", argv), "machine": machine(), "settings": results}
    write_result(args.out or RESULTS / f"edit_capacity_{args.split}.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
