"""Visual outputs: heatmaps, overlays, label masks, captioned panels, PNG files and an HTML report.

Everything here is model-agnostic and works on plain numpy arrays, so the segmentation eval, the
demo and the ``heatmap`` command draw their figures the same way. Only Pillow and numpy are used
(no matplotlib): the colormaps are small lookup tables interpolated to 256 entries, captions are
drawn with Pillow's default font, and files are written atomically through
:mod:`t2ialign.core.fileio`, so a killed run never leaves a half-written PNG or report behind.

Conventions: images are ``(H, W, 3) uint8``; heatmaps are ``(H, W)`` floats in ``[0, 1]``; label
masks are ``(H, W)`` integers where 0 is background and ``ignore_index`` (255) marks void pixels.
"""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from t2ialign.core.errors import InputError, NumericalError
from t2ialign.core.fileio import atomic_write_bytes, atomic_write_text

__all__ = [
    "CAPTION_HEIGHT",
    "COLORMAPS",
    "GAP",
    "heatmap_to_rgb",
    "label_palette",
    "label_to_rgb",
    "overlay",
    "panel",
    "save_png",
    "segmentation_panel",
    "write_html_report",
]

# Layout constants of :func:`panel`, public so callers (and tests) can predict figure sizes.
CAPTION_HEIGHT = 18  # pixels of the caption strip above every tile
GAP = 6  # pixels of white between tiles and around the whole grid
_FONT_SIZE = 13
_BACKGROUND = 255  # white figure background, as in a paper
_FRAME = (170, 170, 170)


# --------------------------------------------------------------------------------------------
# colormaps
# --------------------------------------------------------------------------------------------

# Control points sampled evenly over [0, 1]; linear interpolation between them is visually
# indistinguishable from the 256-entry originals for heatmaps at these sizes.
_VIRIDIS_POINTS = [
    "440154", "482878", "3e4989", "31688e", "26828e",
    "1f9e89", "35b779", "6ece58", "b5de2b", "fde725",
]  # fmt: skip
_MAGMA_POINTS = [
    "000004", "180f3d", "440f76", "721f81", "9e2f7f",
    "cd4071", "f1605d", "fd9668", "feca8d", "fcfdbf",
]  # fmt: skip


def _lut_from_points(points: Sequence[str]) -> np.ndarray:
    anchors = np.array([[int(p[i : i + 2], 16) for i in (0, 2, 4)] for p in points], dtype=np.float64)
    xs = np.linspace(0.0, 1.0, len(points))
    grid = np.linspace(0.0, 1.0, 256)
    lut = np.stack([np.interp(grid, xs, anchors[:, c]) for c in range(3)], axis=1)
    return np.round(lut).astype(np.uint8)


def _jet_lut() -> np.ndarray:
    # Jet is piecewise linear: each channel is a tent of width 1.5 centred at 1/4, 1/2, 3/4
    # (blue, green, red), clipped to [0, 1]; dark blue at 0, dark red at 1.
    x = np.linspace(0.0, 1.0, 256)
    channels = [np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)]
    return np.round(np.stack(channels, axis=1) * 255.0).astype(np.uint8)


COLORMAPS: dict[str, np.ndarray] = {
    "jet": _jet_lut(),
    "viridis": _lut_from_points(_VIRIDIS_POINTS),
    "magma": _lut_from_points(_MAGMA_POINTS),
}
"""Name -> ``(256, 3) uint8`` lookup table."""

# A heatmap that leaves [0, 1] by more than this is almost certainly unnormalised (e.g. raw
# attention or 0..255), which would silently saturate; rounding noise below it is clipped.
_RANGE_TOLERANCE = 1e-3


def _check_heat(heat: Any, where: str) -> np.ndarray:
    arr = np.asarray(heat)
    if arr.ndim != 2:
        raise InputError(
            f"a heatmap must be a 2-D (H, W) array, got shape {arr.shape}",
            where=where,
            fix="pass one class's map; squeeze batch/channel axes first",
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise InputError(f"a heatmap must be numeric, got dtype {arr.dtype}", where=where,
                         fix="pass a float array in [0, 1]")
    arr = arr.astype(np.float64)
    if arr.size and not np.isfinite(arr).all():
        raise NumericalError(
            "the heatmap contains NaN or Inf", where=where,
            fix="check the attention maps / calibration upstream; min-max of a constant map divides by zero",
        )
    if arr.size and (arr.min() < -_RANGE_TOLERANCE or arr.max() > 1.0 + _RANGE_TOLERANCE):
        raise InputError(
            f"heatmap values must lie in [0, 1], got [{arr.min():.4g}, {arr.max():.4g}]",
            where=where,
            fix="min-max normalise the map before drawing it",
        )
    return np.clip(arr, 0.0, 1.0)


def heatmap_to_rgb(heat: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Colour a ``(H, W)`` map with values in ``[0, 1]`` as an ``(H, W, 3) uint8`` image.

    ``cmap`` is one of :data:`COLORMAPS` ("jet", "viridis", "magma").
    """
    if cmap not in COLORMAPS:
        raise InputError(f"unknown colormap {cmap!r}", where="heatmap_to_rgb(cmap=...)",
                         fix=f"use one of {sorted(COLORMAPS)}")
    values = _check_heat(heat, "heatmap_to_rgb(heat)")
    index = np.round(values * 255.0).astype(np.intp)
    return COLORMAPS[cmap][index]


# --------------------------------------------------------------------------------------------
# images, overlays and label masks
# --------------------------------------------------------------------------------------------


def _as_rgb(image: Any, where: str) -> np.ndarray:
    """An ``(H, W, 3) uint8`` view of ``image``; also accepts grey, RGBA and floats in [0, 1]."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InputError(
            f"an image must be (H, W, 3) (or grey / RGBA), got shape {arr.shape}",
            where=where,
            fix="pass channels last: convert a (3, H, W) tensor with .permute(1, 2, 0)",
        )
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and np.isfinite(arr).all() \
                and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = np.round(arr * 255.0).astype(np.uint8)
        else:
            raise InputError(
                f"an image must be uint8 (or float in [0, 1]), got dtype {arr.dtype}",
                where=where,
                fix="convert with (x * 255).round().astype(np.uint8), or undo the [-1, 1] scaling first",
            )
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a coloured heatmap over ``image``: ``(1 - alpha) * image + alpha * colour(heat)``.

    ``alpha = 0`` returns the image unchanged and ``alpha = 1`` the coloured heatmap alone.
    ``heat`` must already be at the image's resolution.
    """
    rgb = _as_rgb(image, "overlay(image)")
    if not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise InputError(f"alpha must be a number in [0, 1], got {alpha!r}", where="overlay(alpha=...)",
                         fix="use e.g. alpha=0.5")
    colour = heatmap_to_rgb(heat, cmap)
    if colour.shape[:2] != rgb.shape[:2]:
        raise InputError(
            f"heatmap size {colour.shape[:2]} does not match image size {rgb.shape[:2]}",
            where="overlay",
            fix="upsample the heatmap to the image size before overlaying it",
        )
    blended = (1.0 - alpha) * rgb.astype(np.float64) + alpha * colour.astype(np.float64)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


@lru_cache(maxsize=1)
def label_palette() -> np.ndarray:
    """The ``(256, 3) uint8`` label palette: 0 black, 255 white, the rest distinct colours.

    Colours come from spreading the bits of the label over the high bits of R, G and B (the
    layout PASCAL VOC masks use), so every label gets its own colour and neighbouring labels
    differ strongly; label 255 is then set to white so void pixels read as "not scored".
    """
    palette = np.zeros((256, 3), dtype=np.uint8)
    for label in range(256):
        rgb = [0, 0, 0]
        bits = label
        for shift in range(7, -1, -1):  # bit k of the label pattern lands on bit `shift`
            for channel in range(3):
                rgb[channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
        palette[label] = rgb
    palette[255] = (255, 255, 255)
    return palette


def label_to_rgb(labels: np.ndarray, palette: np.ndarray | None = None, ignore_index: int = 255) -> np.ndarray:
    """Colour an ``(H, W)`` integer label mask; ``ignore_index`` is drawn white.

    ``palette`` is an optional ``(N, 3) uint8`` table indexed by label (defaults to
    :func:`label_palette`); every label in the mask other than ``ignore_index`` must index it.
    """
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise InputError(f"a label mask must be 2-D (H, W), got shape {arr.shape}", where="label_to_rgb(labels)",
                         fix="pass one mask; squeeze batch/channel axes first")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise InputError(f"a label mask must hold integers, got dtype {arr.dtype}", where="label_to_rgb(labels)",
                         fix="argmax the heatmaps, or cast a float mask with .astype(np.int64)")
    table = label_palette() if palette is None else np.asarray(palette)
    if table.ndim != 2 or table.shape[1] != 3 or table.dtype != np.uint8:
        raise InputError(f"a palette must be an (N, 3) uint8 table, got {table.shape} {table.dtype}",
                         where="label_to_rgb(palette)", fix="pass None to use the built-in palette")
    arr = arr.astype(np.int64)
    ignore = arr == ignore_index
    scored = arr[~ignore]
    if scored.size and (scored.min() < 0 or scored.max() >= len(table)):
        raise InputError(
            f"labels range over [{scored.min()}, {scored.max()}] but the palette has {len(table)} colours",
            where="label_to_rgb",
            fix=f"use labels 0..{len(table) - 1} (and {ignore_index} for void), or a longer palette",
        )
    out = table[np.where(ignore, 0, arr)]
    out[ignore] = (255, 255, 255)
    return out


# --------------------------------------------------------------------------------------------
# panels
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's built-in default font: FreeType-rendered when Pillow has FreeType, its bitmap
    # font otherwise. Either way nothing is read from disk and output is the same everywhere.
    return ImageFont.load_default(size=_FONT_SIZE)


def _drawable(text: str) -> str:
    """``text`` as one line the current font can encode (the bitmap fallback is latin-1 only)."""
    text = " ".join(str(text).split())
    if isinstance(_font(), ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", errors="replace").decode("latin-1")


def _draw_text(draw: ImageDraw.ImageDraw, baseline_left: tuple[int, int], text: str) -> None:
    """Draw black ``text`` whose baseline starts at ``baseline_left``."""
    font = _font()
    x, y = baseline_left
    if isinstance(font, ImageFont.FreeTypeFont):
        # anchor "ls" = left/baseline, so captions with and without descenders line up
        draw.text((x, y), text, fill=(0, 0, 0), font=font, anchor="ls")
    else:  # the bitmap fallback font supports no anchors; its glyphs are ~11 px tall
        draw.text((x, y - 10), text, fill=(0, 0, 0), font=font)


def _fit_caption(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """``text`` made drawable and shortened with an ellipsis until it fits ``width`` pixels."""
    font = _font()
    text = _drawable(text)
    if draw.textlength(text, font=font) <= width:
        return text
    mark = "…" if isinstance(font, ImageFont.FreeTypeFont) else "..."
    while text and draw.textlength(text + mark, font=font) > width:
        text = text[:-1]
    return text + mark if text else ""


def panel(tiles: Sequence[tuple[str, np.ndarray | None]], columns: int | None = None, scale: int = 1) -> np.ndarray:
    """Lay ``(title, image)`` tiles out in a grid with a caption strip above each tile.

    Tiles are upscaled ``scale`` times with nearest-neighbour sampling (so a 64x64 toy image
    stays crisp and pixel-exact) and placed top-left in cells as large as the largest tile; an
    image of None leaves its cell empty.
    ``columns`` defaults to all tiles in one row. With cell size ``(h, w)`` after scaling, the
    figure is ``rows * (CAPTION_HEIGHT + h) + (rows + 1) * GAP`` high and
    ``columns * w + (columns + 1) * GAP`` wide, on a white background.
    """
    if not tiles:
        raise InputError("panel() needs at least one tile", where="panel(tiles)",
                         fix="pass a list of (title, image) pairs")
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise InputError(f"scale must be a positive integer, got {scale!r}", where="panel(scale=...)",
                         fix="use scale=1 for full-size images, 2-4 for 64x64 toy images")
    if columns is None:
        columns = len(tiles)
    if not isinstance(columns, int) or isinstance(columns, bool) or columns < 1:
        raise InputError(f"columns must be a positive integer, got {columns!r}", where="panel(columns=...)",
                         fix="leave it out for one row")
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)

    images: list[tuple[str, np.ndarray | None]] = []
    for i, tile in enumerate(tiles):
        if not (isinstance(tile, (tuple, list)) and len(tile) == 2):
            raise InputError(f"tile {i} is not a (title, image) pair", where="panel(tiles)",
                             fix="pass [(title, image), ...]")
        if tile[1] is None:  # an empty cell, e.g. to start the next row
            images.append((str(tile[0]), None))
            continue
        rgb = _as_rgb(tile[1], f"panel tile {i} ({tile[0]!r})")
        if scale > 1:
            rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
        images.append((str(tile[0]), rgb))
    drawn = [img for _, img in images if img is not None]
    if not drawn:
        raise InputError("panel() got only empty cells", where="panel(tiles)", fix="pass at least one image")
    cell_h = max(img.shape[0] for img in drawn)
    cell_w = max(img.shape[1] for img in drawn)

    height = rows * (CAPTION_HEIGHT + cell_h) + (rows + 1) * GAP
    width = columns * cell_w + (columns + 1) * GAP
    canvas = Image.new("RGB", (width, height), (_BACKGROUND,) * 3)
    draw = ImageDraw.Draw(canvas)
    for i, (title, img) in enumerate(images):
        row, col = divmod(i, columns)
        x = GAP + col * (cell_w + GAP)
        y = GAP + row * (CAPTION_HEIGHT + cell_h + GAP)
        _draw_text(draw, (x, y + CAPTION_HEIGHT - 5), _fit_caption(draw, title, cell_w))
        if img is None:
            continue
        top = y + CAPTION_HEIGHT
        # a thin grey frame in the gap, so white (void) pixels at a tile's edge stay visible
        draw.rectangle([x - 1, top - 1, x + img.shape[1], top + img.shape[0]], outline=_FRAME)
        canvas.paste(Image.fromarray(img), (x, top))
    return np.asarray(canvas).copy()


def _legend_strip(legend: Mapping[int, str], palette: np.ndarray, width: int, void: bool) -> np.ndarray:
    """A white strip, ``width`` wide, of colour swatches and ``label name`` entries, wrapped to lines."""
    entries = [(tuple(int(c) for c in palette[label]), f"{label} {name}") for label, name in sorted(legend.items())]
    if void:
        entries.append(((255, 255, 255), "void (not scored)"))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    swatch, line = _FONT_SIZE - 1, _FONT_SIZE + 7
    # first pass: place entries left to right, wrapping at the figure width
    placed, x, row = [], GAP, 0
    for colour, text in entries:
        text = _fit_caption(probe, text, width - 3 * GAP - swatch)
        item_w = swatch + 5 + int(math.ceil(probe.textlength(text, font=_font()))) + 3 * GAP
        if x > GAP and x + item_w > width:
            x, row = GAP, row + 1
        placed.append((x, row, colour, text))
        x += item_w
    canvas = Image.new("RGB", (width, (row + 1) * line + GAP), (_BACKGROUND,) * 3)
    draw = ImageDraw.Draw(canvas)
    for x, row, colour, text in placed:
        y = row * line + 3
        draw.rectangle([x, y, x + swatch, y + swatch], fill=colour, outline=(0, 0, 0))
        _draw_text(draw, (x + swatch + 5, y + swatch - 1), text)
    return np.asarray(canvas).copy()


#: longest side, in pixels, of one tile of :func:`segmentation_panel` (4 tiles a row: ~2 kpx wide)
PANEL_TILE_MAX = 512


def _panel_shrink(size: tuple[int, int]) -> tuple[int, int] | None:
    """The (height, width) a tile of an image of ``size`` is shown at, None when it fits as it is."""
    h, w = size
    if max(h, w) <= PANEL_TILE_MAX:
        return None
    f = PANEL_TILE_MAX / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def _nearest(array: Any, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize by index picking: keeps label values and any dtype exact."""
    arr = np.asarray(array)
    rows = (np.arange(size[0]) * arr.shape[0] // size[0]).astype(np.int64)
    cols = (np.arange(size[1]) * arr.shape[1] // size[1]).astype(np.int64)
    return arr[rows][:, cols]


def _downsize(size: tuple[int, int], rgb: np.ndarray, gt: Any, base: Any, cal: Any,
              heat_b: Mapping[str, Any], heat_c: Mapping[str, Any]) -> tuple[Any, ...]:
    """Every input of :func:`segmentation_panel` at tile size: bilinear for pixels and heat, nearest for labels."""
    def smooth(heat: Any) -> np.ndarray:
        arr = _check_heat(heat, "segmentation_panel heatmap")
        img = Image.fromarray(arr.astype(np.float32), mode="F").resize((size[1], size[0]), Image.BILINEAR)
        return np.clip(np.asarray(img), 0.0, 1.0)

    small = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))
    labels = [None if m is None else _nearest(m, size) for m in (gt, base, cal)]
    return (small, *labels, {k: smooth(v) for k, v in heat_b.items()}, {k: smooth(v) for k, v in heat_c.items()})


def segmentation_panel(
    image: np.ndarray,
    gt: np.ndarray | None,
    baseline_labels: np.ndarray,
    calibrated_labels: np.ndarray,
    heatmaps_baseline: Mapping[str, np.ndarray],
    heatmaps_calibrated: Mapping[str, np.ndarray],
    scores: Mapping[str, float] | None = None,
    *,
    legend: Mapping[int, str] | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    scale: int | None = None,
    ignore_index: int = 255,
) -> np.ndarray:
    """The per-image figure of the eval and the demo.

    First row: image, ground truth, baseline mask, calibrated mask. Then, per class, the heatmap
    before and after calibration overlaid on the image, side by side, two classes to a row; the
    calibrated tile's title carries the class's alignment score ``S`` when ``scores`` has it.
    ``gt`` may be None (generated images have no ground truth). When ``legend`` maps label
    values to class names, a strip of colour swatches under the figure explains the masks.
    ``scale`` defaults to the smallest integer that makes tiles at least 200 pixels wide, so
    64x64 toy images stay readable and their titles fit. A large image is shown downsized to at
    most :data:`PANEL_TILE_MAX` pixels a side (the panel of a 4000x3000 photo would otherwise be
    16000 pixels wide, past Pillow's decompression-bomb warning); the full-size heatmaps are the
    caller's separate files.
    """
    rgb = _as_rgb(image, "segmentation_panel(image)")
    shrink = _panel_shrink(rgb.shape[:2])
    if shrink is not None:
        rgb, gt, baseline_labels, calibrated_labels, heatmaps_baseline, heatmaps_calibrated = _downsize(
            shrink, rgb, gt, baseline_labels, calibrated_labels, heatmaps_baseline, heatmaps_calibrated)
    size = rgb.shape[:2]
    missing = sorted(set(heatmaps_baseline) ^ set(heatmaps_calibrated))
    if missing:
        raise InputError(
            f"baseline and calibrated heatmaps must name the same classes; only one side has {missing}",
            where="segmentation_panel", fix="pass one map per class on both sides",
        )
    if scale is None:
        scale = max(1, math.ceil(200 / max(1, size[1])))

    def mask(name: str, labels: np.ndarray) -> np.ndarray:
        coloured = label_to_rgb(labels, ignore_index=ignore_index)
        if coloured.shape[:2] != size:
            raise InputError(f"{name} mask size {coloured.shape[:2]} does not match image size {size}",
                             where="segmentation_panel", fix="resize masks to the image (nearest neighbour)")
        return coloured

    tiles: list[tuple[str, np.ndarray | None]] = [("image", rgb)]
    masks = [("ground truth", gt)] if gt is not None else []
    masks += [("baseline", baseline_labels), ("calibrated", calibrated_labels)]
    tiles += [(name, mask(name, labels)) for name, labels in masks]
    columns = 4
    while len(tiles) % columns:  # keep each class's before/after pair on one row
        tiles.append(("", None))

    for name in heatmaps_baseline:
        base = overlay(rgb, _check_heat(heatmaps_baseline[name], f"heatmaps_baseline[{name!r}]"), alpha, cmap)
        cal = overlay(rgb, _check_heat(heatmaps_calibrated[name], f"heatmaps_calibrated[{name!r}]"), alpha, cmap)
        title = f"{name}: calibrated"
        if scores is not None and name in scores:
            title += f" (S={float(scores[name]):.2f})"
        tiles.append((f"{name}: uncalibrated", base))
        tiles.append((title, cal))
    figure = panel(tiles, columns=columns, scale=scale)
    if legend:
        has_void = any(np.any(np.asarray(m) == ignore_index) for _, m in masks)
        figure = np.concatenate([figure, _legend_strip(legend, label_palette(), figure.shape[1], has_void)])
    return figure


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write an ``(H, W, 3)`` (or grey ``(H, W)``) uint8 array as a PNG, atomically."""
    arr = np.asarray(array)
    if arr.ndim == 2 and arr.dtype == np.uint8:
        img = Image.fromarray(arr, mode="L")
    else:
        img = Image.fromarray(_as_rgb(arr, f"save_png({path})"))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=6)  # optimize=True: ~4x slower, ~5% smaller
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; line-height: 1.4; }
h1 { font-size: 1.6rem; margin-bottom: 0.5rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.92rem; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 0.3rem; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 0.25rem 0.8rem; text-align: left; }
thead th { border-bottom: 2px solid #888; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #f7f7f7; }
ul.notes { color: #555; }
.gallery { display: flex; flex-wrap: wrap; gap: 1.2rem; }
figure { margin: 0; }
figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { font-size: 0.88rem; color: #444; margin-top: 0.2rem; }
"""


def _format_value(value: Any) -> tuple[str, bool]:
    """Cell text of ``value`` and whether it is numeric (right-aligned)."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()  # numpy / torch scalars
    if isinstance(value, bool) or value is None:
        return ("—" if value is None else str(value)), False
    if isinstance(value, int):
        return str(value), True
    if isinstance(value, float):
        if math.isnan(value):
            return "—", True
        # fixed decimals keep a metric column aligned: fractions (IoU 0.4123) get four,
        # percentages and counts (mIoU 41.23) two; very small or large values go scientific
        magnitude = abs(value)
        if math.isinf(value) or (0 < magnitude < 1e-3) or magnitude >= 1e6:
            return f"{value:.3e}", True
        return (f"{value:.4f}" if magnitude < 10 else f"{value:.2f}"), True
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, default=str), False
    return str(value), False


def _cell(tag: str, value: Any) -> str:
    text, numeric = _format_value(value)
    klass = ' class="num"' if numeric and tag == "td" else ""
    return f"<{tag}{klass}>{html.escape(text)}</{tag}>"


def _image_src(path: str | Path, index: int) -> str:
    raw = str(path)
    parts = urlsplit(raw)
    if parts.scheme or parts.netloc or raw.startswith(("/", "\\")) or Path(raw).is_absolute():
        raise InputError(
            f"report image {raw!r} must be a path relative to the report file",
            where=f"write_html_report(images[{index}])",
            fix="pass e.g. 'panels/0001.png' and keep the PNGs next to the report",
        )
    return quote(PurePosixPath(Path(raw).as_posix()).as_posix())


def write_html_report(
    path: str | Path,
    *,
    title: str,
    summary: Mapping[str, Any],
    tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]] = (),
    images: Sequence[tuple[str, str | Path]] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Write one static HTML page: summary, metric tables, notes and an image gallery.

    The page has inline CSS and no scripts; every piece of text (titles, class names, cell
    values) is HTML-escaped. ``tables`` are ``(caption, header, rows)`` with one cell per header
    column; floats get four decimals below 10 and two above, NaN and None show as a dash.
    ``images`` are ``(caption, path)`` with paths relative to the report file (the PNGs are
    linked, not embedded, so the page stays small). Written atomically.
    """
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(str(title))}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(str(title))}</h1>",
    ]
    if summary:
        out.append("<h2>Summary</h2>")
        out.append("<table><tbody>")
        for key, value in summary.items():
            out.append(f"<tr>{_cell('th', key)}{_cell('td', value)}</tr>")
        out.append("</tbody></table>")

    if tables:
        out.append("<h2>Results</h2>")
    for t, table in enumerate(tables):
        if not (isinstance(table, (tuple, list)) and len(table) == 3):
            raise InputError(f"table {t} is not a (caption, header, rows) triple", where="write_html_report(tables)",
                             fix="pass [(caption, [column names], [[cells], ...]), ...]")
        caption, header, rows = table
        out.append("<table>")
        out.append(f"<caption>{esc(str(caption))}</caption>")
        out.append("<thead><tr>" + "".join(_cell("th", h) for h in header) + "</tr></thead>")
        out.append("<tbody>")
        for r, row in enumerate(rows):
            if len(row) != len(header):
                raise InputError(
                    f"row {r} of table {caption!r} has {len(row)} cells but the header has {len(header)}",
                    where=f"write_html_report(tables[{t}])",
                    fix="give every row one value per header column (use None for a missing value)",
                )
            out.append("<tr>" + "".join(_cell("td", v) for v in row) + "</tr>")
        out.append("</tbody></table>")

    if notes:
        out.append("<h2>Notes</h2>")
        out.append('<ul class="notes">' + "".join(f"<li>{esc(str(n))}</li>" for n in notes) + "</ul>")

    if images:
        out.append("<h2>Figures</h2>")
        out.append('<div class="gallery">')
        for i, (caption, src) in enumerate(images):
            href = esc(_image_src(src, i), quote=True)
            alt = esc(str(caption), quote=True)
            out.append(f'<figure><a href="{href}"><img src="{href}" alt="{alt}" loading="lazy"></a>'
                       f"<figcaption>{esc(str(caption))}</figcaption></figure>")
        out.append("</div>")

    out += ["</body>", "</html>", ""]
    path = Path(path)
    atomic_write_text(path, "\n".join(out))
    return path
