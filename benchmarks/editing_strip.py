"""A picture strip of real editing outputs: source, baseline-mask edit, calibrated-mask edit.

Reads the per-pair arrays an editing run stores (``<run>/edits/*.npz``, written by
``t2ialign eval editing``) and the run's records, and lays out one row per edit pair with the
source image, the uncalibrated (baseline) blend mask and its edit, the calibrated mask and its
edit, captioned with the edit and the colour verdicts. Nothing is re-run: the strip shows
exactly the images the run's numbers were computed from.

    python benchmarks/editing_strip.py runs/bench/editing-toy --out docs/img/editing-strip.png --n 6
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from t2ialign.core.errors import InputError  # noqa: E402
from t2ialign.core.fileio import read_jsonl  # noqa: E402
from _common import strip_main  # noqa: E402
from t2ialign.core.report import panel  # noqa: E402
from t2ialign.plugins.tasks.common import safe_name  # noqa: E402


def _verdict(row: dict) -> str:
    edited = row.get("colour_edited")
    if edited is None or edited != edited:  # NaN: not a colour edit
        return ""
    return " (done)" if edited == 1.0 else " (not done)"


def strip(run: Path, n: int, scale: int = 3) -> np.ndarray:
    """The strip of the first ``n`` pairs of an editing run as an RGB array."""
    records = sorted((r for p in run.glob("records.*.jsonl") for r in read_jsonl(p)), key=lambda r: r["id"])
    if not records:
        raise InputError(f"no editing records in {run}", where="editing_strip",
                         fix="point at the --output folder of a finished 't2ialign eval editing' run")
    tiles = []
    for r in records[:n]:
        path = run / "edits" / f"{safe_name(r['id'])}.npz"
        if not path.exists():
            continue
        with np.load(path) as data:
            arr = {k: data[k] for k in data.files}
        src, tgt = r["source"].split(), r["target"].split()
        ops = difflib.SequenceMatcher(a=src, b=tgt, autojunk=False).get_opcodes()
        changed = [w for tag, _, _, j1, j2 in ops if tag != "equal" for w in tgt[j1:j2]]
        tiles.append((f"source; edit -> {' '.join(changed)}", arr["source"]))
        for name in ("baseline", "calibrated"):
            mask = arr[f"mask_{name}"].astype(np.uint8) * 255
            tiles.append((f"{name} mask", np.repeat(mask[:, :, None], 3, axis=2)))
            tiles.append((f"{name} edit{_verdict(r['variants'][name])}", arr[f"edit_{name}"]))
    if not tiles:
        raise InputError(f"the records of {run} have no stored edit arrays", where="editing_strip",
                         fix="rerun the editing evaluation (it stores edits/<id>.npz per pair)")
    return panel(tiles, columns=5, scale=scale)


def main(argv: list[str] | None = None) -> int:
    return strip_main(strip, __doc__, "an editing", "docs/img/editing-strip.png", 6, argv)


if __name__ == "__main__":
    raise SystemExit(main())
