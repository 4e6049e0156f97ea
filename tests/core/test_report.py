"""Tests of the visual outputs in t2ialign.core.report: colours, panels, PNG files and the HTML report."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2ialign.core import report
from t2ialign.core.errors import InputError, NumericalError
from t2ialign.core.report import (
    CAPTION_HEIGHT,
    GAP,
    heatmap_to_rgb,
    label_palette,
    label_to_rgb,
    overlay,
    panel,
    save_png,
    segmentation_panel,
    write_html_report,
)

RNG = np.random.default_rng(0)


def _image(h: int = 16, w: int = 20) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _ramp(h: int = 16, w: int = 20) -> np.ndarray:
    return np.tile(np.linspace(0.0, 1.0, w), (h, 1))


# ------------------------------------------------------------------------------ heatmaps


@pytest.mark.parametrize("cmap", ["jet", "viridis", "magma"])
def test_heatmap_to_rgb_shape_dtype_and_ends(cmap: str) -> None:
    rgb = heatmap_to_rgb(_ramp(), cmap)
    assert rgb.shape == (16, 20, 3) and rgb.dtype == np.uint8
    # the two ends of a colormap are different colours and the ramp is not constant
    assert not np.array_equal(rgb[0, 0], rgb[0, -1])
    assert len({tuple(c) for c in rgb[0]}) > 10


def test_colormap_ends_match_their_definition() -> None:
    ends = {name: (heatmap_to_rgb(np.array([[0.0, 1.0]]), name)[0]) for name in ("jet", "viridis", "magma")}
    assert ends["jet"][0].tolist() == [0, 0, 128] and ends["jet"][1].tolist() == [128, 0, 0]
    assert ends["viridis"][0].tolist() == [0x44, 0x01, 0x54] and ends["viridis"][1].tolist() == [0xFD, 0xE7, 0x25]
    # magma runs dark to light
    assert ends["magma"][0].sum() < 20 < 600 < ends["magma"][1].astype(int).sum()


def test_heatmap_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="colormap"):
        heatmap_to_rgb(_ramp(), "rainbow")
    with pytest.raises(InputError, match="2-D"):
        heatmap_to_rgb(np.zeros((1, 4, 4)))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        heatmap_to_rgb(_ramp() * 255)  # an unnormalised map must not silently saturate
    bad = _ramp()
    bad[3, 3] = np.nan
    with pytest.raises(NumericalError, match="NaN"):
        heatmap_to_rgb(bad)
    # rounding noise just outside [0, 1] is clipped, not refused
    assert heatmap_to_rgb(np.array([[-1e-6, 1 + 1e-6]]), "viridis").tolist() == heatmap_to_rgb(
        np.array([[0.0, 1.0]]), "viridis"
    ).tolist()


# ------------------------------------------------------------------------------ overlay


def test_overlay_alpha_extremes_and_middle() -> None:
    image, heat = _image(), _ramp()
    assert np.array_equal(overlay(image, heat, alpha=0.0), image)
    assert np.array_equal(overlay(image, heat, alpha=1.0), heatmap_to_rgb(heat))
    half = overlay(image, heat, alpha=0.5).astype(int)
    expected = (image.astype(int) + heatmap_to_rgb(heat).astype(int)) / 2
    assert np.abs(half - expected).max() <= 0.5 + 1e-9
    assert half.shape == image.shape


def test_overlay_accepts_grey_and_float_images() -> None:
    grey = RNG.integers(0, 256, size=(16, 20), dtype=np.uint8)
    out = overlay(grey, _ramp(), alpha=0.0)
    assert out.shape == (16, 20, 3) and np.array_equal(out[..., 0], grey) and np.array_equal(out[..., 2], grey)
    as_float = _image().astype(np.float32) / 255.0
    assert overlay(as_float, _ramp(), alpha=0.0).dtype == np.uint8


def test_overlay_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="does not match image size"):
        overlay(_image(16, 20), _ramp(8, 10))
    with pytest.raises(InputError, match="alpha"):
        overlay(_image(), _ramp(), alpha=1.5)
    with pytest.raises(InputError, match="channels last"):
        overlay(np.zeros((3, 16, 20), np.uint8), _ramp())
    with pytest.raises(InputError, match="uint8"):
        overlay(_image().astype(np.float32), _ramp())  # 0..255 floats: ambiguous scaling


# ------------------------------------------------------------------------------ labels


def test_label_palette_distinct_with_fixed_background_and_void() -> None:
    palette = label_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[255].tolist() == [255, 255, 255]
    assert len({tuple(c) for c in palette.tolist()}) == 256
    # the first classes differ clearly from each other, not just by one intensity step
    first = palette[:21].astype(int)
    gaps = [np.abs(first[i] - first[j]).max() for i in range(21) for j in range(i + 1, 21)]
    assert min(gaps) >= 64


def test_label_to_rgb_colours_and_void() -> None:
    labels = np.array([[0, 1, 2], [255, 20, 1]])
    rgb = label_to_rgb(labels)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 0]
    assert rgb[1, 0].tolist() == [255, 255, 255]
    assert np.array_equal(rgb[0, 1], rgb[1, 2])
    assert not np.array_equal(rgb[0, 1], rgb[0, 2])
    # another ignore index is white too, and a custom palette is used as given
    custom = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    out = label_to_rgb(np.array([[0, 1, -1]]), palette=custom, ignore_index=-1)
    assert out[0].tolist() == [[1, 2, 3], [4, 5, 6], [255, 255, 255]]


def test_label_to_rgb_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="integers"):
        label_to_rgb(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(InputError, match="palette has 2"):
        label_to_rgb(np.array([[0, 2]]), palette=np.zeros((2, 3), np.uint8))
    with pytest.raises(InputError, match="2-D"):
        label_to_rgb(np.zeros((1, 4, 4), dtype=np.int64))


# ------------------------------------------------------------------------------ panels


@pytest.mark.parametrize(("n", "columns", "scale"), [(1, None, 1), (5, None, 1), (5, 2, 3), (4, 4, 2), (3, 10, 1)])
def test_panel_size_arithmetic(n: int, columns: int | None, scale: int) -> None:
    h, w = 10, 14
    out = panel([(f"tile {i}", _image(h, w)) for i in range(n)], columns=columns, scale=scale)
    cols = min(columns or n, n)
    rows = -(-n // cols)
    assert out.dtype == np.uint8
    assert out.shape == (rows * (CAPTION_HEIGHT + h * scale) + (rows + 1) * GAP, cols * w * scale + (cols + 1) * GAP, 3)


def test_panel_places_tiles_pixel_exact_with_nearest_upscaling() -> None:
    a, b = _image(6, 8), _image(6, 8)
    out = panel([("a", a), ("b", b)], columns=1, scale=3)
    top = GAP + CAPTION_HEIGHT
    assert np.array_equal(out[top : top + 18, GAP : GAP + 24], a.repeat(3, 0).repeat(3, 1))
    top_b = top + 18 + GAP + CAPTION_HEIGHT
    assert np.array_equal(out[top_b : top_b + 18, GAP : GAP + 24], b.repeat(3, 0).repeat(3, 1))


def test_panel_draws_captions_and_uses_largest_cell() -> None:
    small, big = _image(4, 4), _image(10, 60)
    out = panel([("", small), ("a caption", big)], columns=2)
    assert out.shape == (CAPTION_HEIGHT + 10 + 2 * GAP, 2 * 60 + 3 * GAP, 3)
    # caption strips, less their last row where the tile's grey frame starts
    strip_a = out[GAP : GAP + CAPTION_HEIGHT - 1, GAP : GAP + 60]
    strip_b = out[GAP : GAP + CAPTION_HEIGHT - 1, 2 * GAP + 60 : 2 * GAP + 120]
    assert (strip_a == 255).all()  # empty caption: white strip
    assert (strip_b < 128).any()  # dark caption text
    # a caption far too long for its tile is cut, never drawn over the neighbour's cell
    long = panel([("x" * 200, _image(8, 8)), ("", _image(8, 8))], columns=2)
    neighbour_strip = long[GAP : GAP + CAPTION_HEIGHT - 1, 2 * GAP + 8 :]
    assert (neighbour_strip == 255).all()


def test_panel_empty_cell_and_bad_input() -> None:
    out = panel([("a", _image(8, 8)), ("", None)], columns=2)
    assert (out[GAP + CAPTION_HEIGHT :, 2 * GAP + 8 + 1 :] == 255).all()
    with pytest.raises(InputError, match="at least one tile"):
        panel([])
    with pytest.raises(InputError, match="scale"):
        panel([("a", _image())], scale=0)
    with pytest.raises(InputError, match="columns"):
        panel([("a", _image())], columns=0)
    with pytest.raises(InputError, match="tile 0"):
        panel([_image()])  # type: ignore[list-item]


def test_panel_falls_back_to_bitmap_font(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFont

    monkeypatch.setattr(report, "_font", ImageFont.load_default_imagefont)
    # the bitmap font is latin-1 only: other characters and the cut-off mark must not crash it
    out = panel([("bitmap 猫 café and a long tail", _image(8, 30))])
    assert (out[GAP : GAP + CAPTION_HEIGHT - 1, GAP : GAP + 30] < 128).any()


def _toy_case(h: int = 16, w: int = 16) -> dict:
    gt = np.zeros((h, w), np.int64)
    gt[2:8, 2:8] = 1
    gt[9:14, 9:14] = 2
    gt[0, :] = 255
    maps = {"cat": _ramp(h, w), "<dog>": _ramp(h, w)[:, ::-1].copy()}
    return dict(image=_image(h, w), gt=gt, baseline_labels=np.roll(gt, 1, axis=0), calibrated_labels=gt,
                heatmaps_baseline=maps, heatmaps_calibrated={k: v**2 for k, v in maps.items()})


def test_segmentation_panel_layout() -> None:
    case = _toy_case()
    out = segmentation_panel(**case, scores={"cat": 0.9}, scale=2)
    # 4 columns; row 1 image/gt/baseline/calibrated, row 2 the two classes' before/after pairs
    assert out.shape == (2 * (CAPTION_HEIGHT + 32) + 3 * GAP, 4 * 32 + 5 * GAP, 3)
    top = GAP + CAPTION_HEIGHT
    assert np.array_equal(out[top : top + 32, GAP : GAP + 32], case["image"].repeat(2, 0).repeat(2, 1))
    x_gt = 2 * GAP + 32
    assert np.array_equal(out[top : top + 32, x_gt : x_gt + 32], label_to_rgb(case["gt"]).repeat(2, 0).repeat(2, 1))
    row2 = 2 * GAP + 2 * CAPTION_HEIGHT + 32
    cal_cat = overlay(case["image"], case["heatmaps_calibrated"]["cat"])
    x_cal = 2 * GAP + 32
    assert np.array_equal(out[row2 : row2 + 32, x_cal : x_cal + 32], cal_cat.repeat(2, 0).repeat(2, 1))


def test_segmentation_panel_default_scale_legend_and_no_gt() -> None:
    case = _toy_case()
    plain = segmentation_panel(**case)
    assert plain.shape[1] >= 4 * 200  # default scale keeps 16x16 tiles readable
    with_legend = segmentation_panel(**case, legend={1: "cat", 2: "<dog>"})
    assert with_legend.shape[1] == plain.shape[1] and with_legend.shape[0] > plain.shape[0]
    case["gt"] = None
    no_gt = segmentation_panel(**case, scale=1)
    # image, baseline, calibrated, one empty cell; then the pairs
    assert no_gt.shape == (2 * (CAPTION_HEIGHT + 16) + 3 * GAP, 4 * 16 + 5 * GAP, 3)


def test_segmentation_panel_rejects_mismatches() -> None:
    case = _toy_case()
    case["heatmaps_calibrated"] = {"cat": _ramp(16, 16)}
    with pytest.raises(InputError, match="same classes"):
        segmentation_panel(**case)
    case = _toy_case()
    case["gt"] = case["gt"][:8]
    with pytest.raises(InputError, match="ground truth mask size"):
        segmentation_panel(**case)
    case = _toy_case()
    case["heatmaps_baseline"]["cat"] = case["heatmaps_baseline"]["cat"] * 3
    with pytest.raises(InputError, match=r"heatmaps_baseline\['cat'\]"):
        segmentation_panel(**case)


# ------------------------------------------------------------------------------ files


def test_save_png_round_trip_and_no_temp_files(tmp_path: Path) -> None:
    image = _image(12, 9)
    path = save_png(tmp_path / "sub" / "x.png", image)
    assert np.array_equal(np.asarray(Image.open(path)), image)
    grey = RNG.integers(0, 256, size=(5, 7), dtype=np.uint8)
    save_png(tmp_path / "sub" / "grey.png", grey)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sub" / "grey.png")), grey)
    save_png(path, image[::-1])  # overwrite in place
    assert np.array_equal(np.asarray(Image.open(path)), image[::-1])
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["grey.png", "x.png"]


def test_save_png_failure_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_png(tmp_path / "x.png", _image())
    before = path.read_bytes()

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("t2ialign.core.fileio.os.replace", boom)
    with pytest.raises(OSError):
        save_png(path, _image(4, 4))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


class _Collector(HTMLParser):
    """Records start tags, their attributes, and all text, and checks tags close in order."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _write_report(path: Path, **overrides: object) -> Path:
    args: dict = dict(
        title="Eval <b>toy</b> & co",
        summary={"backbone": "toy", "mIoU baseline": 0.41234, "mIoU calibrated": 56.789, "images": 2,
                 "threshold": None, "config": {"gamma": 2}},
        tables=[
            ("Per-class IoU", ["class", "baseline", "calibrated"],
             [["cat", 0.5, np.float32(0.7)], ["<script>alert(1)</script>", float("nan"), 0.3]]),
            ("Size buckets", ["bucket", "mIoU"], [["small", 1e-5], ["large", 12.0]]),
        ],
        images=[("image 0 <cat>", "panels/0000.png"), ("image 1", Path("panels") / "my image.png")],
        notes=["threshold tuned on the held-out split", "a < b"],
    )
    args.update(overrides)
    return write_html_report(path, **args)


def test_html_report_parses_and_escapes(tmp_path: Path) -> None:
    path = _write_report(tmp_path / "report.html")
    source = path.read_text(encoding="utf-8")
    assert "<script>" not in source.lower() and "<b>" not in source
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in source

    parser = _Collector()
    parser.feed(source)
    parser.close()
    assert parser.stack == []  # every element closed
    tags = [t for t, _ in parser.tags]
    assert "script" not in tags and tags.count("table") == 3  # summary + two metric tables
    text = "".join(parser.text)
    for shown in ("Eval <b>toy</b> & co", "<script>alert(1)</script>", "0.4123", "56.79", "0.7000", "1.000e-05",
                  "12.00", "image 0 <cat>", "a < b", '{"gamma": 2}', "—"):
        assert shown in text, shown
    srcs = [a["src"] for t, a in parser.tags if t == "img"]
    assert srcs == ["panels/0000.png", "panels/my%20image.png"]


def test_html_report_numbers_right_aligned(tmp_path: Path) -> None:
    parser = _Collector()
    parser.feed(_write_report(tmp_path / "r.html").read_text(encoding="utf-8"))
    cells = [(a.get("class")) for t, a in parser.tags if t == "td"]
    # summary: toy, 0.4123, 56.79, 2, None, config; then class/metric rows
    assert cells[:6] == [None, "num", "num", "num", None, None]


def test_html_report_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="row 0 of table 'T' has 1 cells but the header has 2"):
        _write_report(tmp_path / "r.html", tables=[("T", ["a", "b"], [[1]])])
    with pytest.raises(InputError, match="relative"):
        _write_report(tmp_path / "r.html", images=[("x", "/abs/x.png")])
    with pytest.raises(InputError, match="relative"):
        _write_report(tmp_path / "r.html", images=[("x", "javascript:alert(1)")])
    with pytest.raises(InputError, match="triple"):
        _write_report(tmp_path / "r.html", tables=[("T", ["a"])])
    assert not (tmp_path / "r.html").exists()


def test_html_report_atomic_no_temp_files(tmp_path: Path) -> None:
    _write_report(tmp_path / "report.html")
    _write_report(tmp_path / "report.html", title="second")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    assert "<title>second</title>" in (tmp_path / "report.html").read_text(encoding="utf-8")
