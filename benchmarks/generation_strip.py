"""A picture strip of real generation outputs: baseline vs ELBO-weighted image per prompt.

Reads a generation run's records and the PNGs it saved (``t2ialign eval generation``), one
row per prompt: baseline and weighted image from the same seed, captioned with the toy
oracle's verdict (requested objects found in their colour) when the run has one. Nothing is
re-run: the strip shows the images the run's numbers were computed from.

    python benchmarks/generation_strip.py runs/bench/generation-toy --out docs/img/generation-strip.png --n 8
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from t2ialign.core.errors import InputError  # noqa: E402
from t2ialign.core.fileio import read_jsonl  # noqa: E402
from _common import strip_main  # noqa: E402
from t2ialign.core.report import panel  # noqa: E402


def _caption(record: dict, variant: str) -> str:
    checks = record.get("oracle", {}).get(variant)
    if not checks:
        return variant
    objects = checks[0]["objects"]
    return f"{variant}: {sum(o['attribute'] for o in objects)}/{len(objects)} right"


def strip(run: Path, n: int, scale: int = 3) -> np.ndarray:
    """The strip of the first ``n`` prompts of a generation run as an RGB array."""
    records = sorted((r for p in run.glob("records.*.jsonl") for r in read_jsonl(p) if "error" not in r),
                     key=lambda r: r["index"])
    if not records:
        raise InputError(f"no generation records in {run}", where="generation_strip",
                         fix="point at the --output folder of a finished 't2ialign eval generation' run")
    tiles = []
    for r in records[:n]:
        for variant in ("baseline", "weighted"):
            path = run / r["images"][variant][0]
            tiles.append((_caption(r, variant), np.asarray(Image.open(path).convert("RGB"))))
        print(f"row {len(tiles) // 2}: {r['prompt']}")
    return panel(tiles, columns=4, scale=scale)


def main(argv: list[str] | None = None) -> int:
    return strip_main(strip, __doc__, "a generation", "docs/img/generation-strip.png", 8, argv)


if __name__ == "__main__":
    raise SystemExit(main())
