"""Reading user images: any Pillow mode in, ``H x W x 3`` uint8 RGB out, clear errors otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from t2ialign.core.errors import InputError

def load_rgb(path: str | Path, *, what: str = "image") -> np.ndarray:
    """Read an image file as ``H x W x 3`` uint8 RGB, whatever its mode.

    Grayscale, palette, RGBA (alpha dropped: masks are drawn on the stored pixels, no
    compositing), CMYK and 16-/32-bit images are converted; integer 16-bit data is rescaled
    (by 1/257) instead of clipped, which Pillow's own ``convert("RGB")`` would do. EXIF
    orientation is ignored for the same reason as alpha. Any size works: backbones resize to
    their own square input size and heatmaps are resized back.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                arr = np.asarray(img).astype(np.float64)
                # "I" holds either 16-bit PNGs (older Pillow opens them as "I") or true 32-bit data
                top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) <= 65535 else arr.max()
                if mode == "F":
                    top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
                gray = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
                rgb = np.repeat(gray[:, :, None], 3, axis=2)
            else:
                rgb = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError as exc:
        raise InputError(f"{what} not found: {path}", where=str(path),
                         fix="check the path (relative paths are taken from the current folder)") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{what} path is a folder, not a file: {path}", where=str(path),
                         fix="pass an image file") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"cannot read {what} {path}: {exc}", where=str(path),
                         fix="the file is corrupt, truncated or not an image: re-export it as PNG or JPEG") from exc
    return rgb
