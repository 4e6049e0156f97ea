"""Mask-dataset loaders on tiny fixture folders written here in each real on-disk layout.

Every dataset is built through the host from a registry file (entry point -> plugin -> spec
defaults), so the test also proves the plugins are wired the way a user reaches them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from t2ialign.core.errors import ConfigError, InputError, T2IAlignError
from t2ialign.core.host import Host
from t2ialign.core.protocols import Dataset, Sample
from t2ialign.core.images import load_rgb as read_rgb
from t2ialign.plugins.datasets._layout import read_label

H, W = 6, 8
RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------------------------
# fixture writers (real layouts)
# --------------------------------------------------------------------------------------------
def _jpg(path: Path, h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format="JPEG", quality=95)


def _palette_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(label.astype(np.uint8))
    img.putpalette([(i * 37) % 256 for i in range(768)])  # a colour table, as VOC ships
    assert img.mode == "P"
    img.save(path)


def _gray_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8)).save(path)


def _label(values: list[int], fill: int = 0) -> np.ndarray:
    """A H x W mask with one horizontal band per value, the rest ``fill``."""
    lab = np.full((H, W), fill, dtype=np.int64)
    for row, v in enumerate(values):
        lab[row, 1:5] = v
    return lab


def make_voc(base: Path, masks: dict[str, np.ndarray], split: str = "val", aug: bool = False) -> Path:
    voc = base / "VOCdevkit" / "VOC2012"
    folder = "SegmentationClassAug" if aug else "SegmentationClass"
    for image_id, lab in masks.items():
        _jpg(voc / "JPEGImages" / f"{image_id}.jpg")
        (_gray_png if aug else _palette_png)(voc / folder / f"{image_id}.png", lab)
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in masks))
    return voc


def make_context(base: Path, masks: dict[str, np.ndarray]) -> Path:
    root = base / "VOCdevkit" / "VOC2010"
    for image_id, lab in masks.items():
        _jpg(root / "JPEGImages" / f"{image_id}.jpg")
        _gray_png(root / "SegmentationClassContext" / f"{image_id}.png", lab)
    sets = root / "ImageSets" / "SegmentationContext"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "val.txt").write_text("\n".join(masks) + "\n")
    return root


def make_coco(base: Path, masks: dict[str, np.ndarray]) -> Path:
    root = base / "coco_stuff164k"
    for image_id, lab in masks.items():
        _jpg(root / "images" / "val2017" / f"{image_id}.jpg")
        _gray_png(root / "annotations" / "val2017" / f"{image_id}_labelTrainIds.png", lab)
    return root


def make_ade(base: Path, masks: dict[str, np.ndarray]) -> Path:
    root = base / "ADEChallengeData2016"
    for image_id, lab in masks.items():
        _jpg(root / "images" / "validation" / f"{image_id}.jpg")
        _gray_png(root / "annotations" / "validation" / f"{image_id}.png", lab)
    return root


def host_for(tmp_path: Path, **entries: dict) -> Host:
    reg = tmp_path / "reg.yaml"
    reg.write_text(yaml.safe_dump({"datasets": entries}))
    return Host(registry_files=[reg])


def check_protocol(ds, sample: Sample) -> None:
    assert isinstance(ds, Dataset)
    assert ds.class_names[0] == "background"
    assert sample.image.dtype == np.uint8 and sample.image.shape == (H, W, 3)
    assert sample.mask.dtype == np.int64 and sample.mask.shape == (H, W)


# --------------------------------------------------------------------------------------------
# the four layouts
# --------------------------------------------------------------------------------------------
def test_voc_palette_masks_referring_classes_and_prompt_words(tmp_path):
    a = _label([15, 1, 255])  # person, aeroplane, boundary
    b = _label([20])
    make_voc(tmp_path, {"2007_000033": a, "2007_000042": b})
    host = host_for(tmp_path, v={"plugin": "voc", "root": str(tmp_path)})  # root = dataset parent
    ds = host.dataset("v", "test")
    assert ds.split == "val" and len(ds) == 2
    s = ds[0]
    check_protocol(ds, s)
    assert s.id == "2007_000033"
    np.testing.assert_array_equal(s.mask, a)  # palette indices kept, 255 stays ignore
    assert s.classes == [1, 15]
    assert ds[1].classes == [20]
    assert ds.class_names[1] == "plane" and ds.class_names[15] == "people" and ds.class_names[20] == "monitor"
    assert len(ds.class_names) == 21


def test_voc_mask_dir_auto_prefers_aug_and_explicit_choice(tmp_path):
    official = _label([1])
    augmented = _label([2])
    voc = make_voc(tmp_path, {"x": official})
    _gray_png(voc / "SegmentationClassAug" / "x.png", augmented)
    host = host_for(tmp_path, auto={"plugin": "voc", "root": str(voc)},
                    official={"plugin": "voc", "root": str(voc), "mask_dir": "SegmentationClass"})
    assert host.dataset("auto", "test")[0].classes == [2]
    assert host.dataset("official", "test")[0].classes == [1]
    bad = host_for(tmp_path, b={"plugin": "voc", "root": str(voc), "mask_dir": "Nope"})
    with pytest.raises(InputError, match="Nope"):
        bad.dataset("b", "test")


def test_logical_splits_test_and_heldout(tmp_path):
    voc = make_voc(tmp_path, {"v1": _label([3])}, split="val")
    make_voc(tmp_path, {"t1": _label([4]), "t2": _label([5])}, split="train")
    host = host_for(tmp_path, v={"plugin": "voc", "root": str(voc)})
    test, heldout, literal = host.dataset("v", "test"), host.dataset("v", "val"), host.dataset("v", "train")
    assert [s.id for s in test] == ["v1"] and test.split == "val"
    assert [s.id for s in heldout] == ["t1", "t2"] and heldout.split == "train"
    assert [s.id for s in literal] == ["t1", "t2"]
    assert not {s.id for s in test} & {s.id for s in heldout}


def test_pascal_context_59(tmp_path):
    lab = _label([59, 1, 40])
    root = make_context(tmp_path, {"2008_000002": lab})
    host = host_for(tmp_path, c={"plugin": "pascal_context", "root": str(tmp_path / "VOCdevkit")})
    ds = host.dataset("c", "test")
    s = ds[0]
    check_protocol(ds, s)
    np.testing.assert_array_equal(s.mask, lab)
    assert s.classes == [1, 40, 59]
    assert len(ds.class_names) == 60
    assert (ds.class_names[1], ds.class_names[40], ds.class_names[55], ds.class_names[59]) == (
        "airplane", "plant", "monitor", "wood")
    assert ds.root == root


def test_coco_object_groupvit_conversion(tmp_path):
    # train ids: 0 person, 79 toothbrush, 80 and 170 stuff, 255 unlabeled
    raw = np.zeros((H, W), dtype=np.int64)
    raw[0], raw[1], raw[2], raw[3], raw[4], raw[5] = 0, 79, 80, 170, 255, 2
    make_coco(tmp_path, {"000000000139": raw, "000000000285": np.full((H, W), 255)})
    host = host_for(tmp_path, co={"plugin": "coco_object", "root": str(tmp_path)})
    ds = host.dataset("co", "test")
    assert [it.id for it in ds.items] == ["000000000139", "000000000285"]
    s = ds[0]
    check_protocol(ds, s)
    expected = np.zeros((H, W), dtype=np.int64)
    expected[0], expected[1], expected[5] = 1, 80, 3  # +1 shift; stuff and unlabeled -> background
    np.testing.assert_array_equal(s.mask, expected)
    assert s.classes == [1, 3, 80]
    assert not (s.mask == 255).any()  # COCO-Object ignores nothing
    assert ds[1].classes == [] and (ds[1].mask == 0).all()
    assert ds.class_names[5] == "aeroplane" and ds.class_names[62] == "closestool" and len(ds.class_names) == 81


def test_ade20k_zero_is_counted_background(tmp_path):
    lab = _label([150, 1], fill=0)
    make_ade(tmp_path, {"ADE_val_00000002": lab, "ADE_val_00000001": _label([13])})
    host = host_for(tmp_path, a={"plugin": "ade20k", "root": str(tmp_path)})
    ds = host.dataset("a", "test")
    assert [it.id for it in ds.items] == ["ADE_val_00000001", "ADE_val_00000002"]  # sorted file names
    s = ds[1]
    check_protocol(ds, s)
    np.testing.assert_array_equal(s.mask, lab)  # no reduce_zero_label: 0 stays background, not 255
    assert s.classes == [1, 150]
    assert (ds.class_names[1], ds.class_names[150], len(ds.class_names)) == ("wall", "flag", 151)


# --------------------------------------------------------------------------------------------
# errors that name what was expected
# --------------------------------------------------------------------------------------------
def test_wrong_layout_names_expected_split_file(tmp_path):
    voc = make_voc(tmp_path, {"x": _label([1])})
    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    host = host_for(tmp_path, v={"plugin": "voc", "root": str(voc)})
    with pytest.raises(InputError) as err:
        host.dataset("v", "test")
    msg = str(err.value)
    assert str(voc / "ImageSets" / "Segmentation" / "val.txt") in msg
    assert "VOC2012 layout: VOCdevkit/VOC2012/{JPEGImages,SegmentationClass[Aug],ImageSets/Segmentation}" in msg


@pytest.mark.parametrize("plugin,expected", [
    ("voc", "JPEGImages"), ("pascal_context", "JPEGImages"),
    ("coco_object", "annotations"), ("ade20k", "annotations"),
])
def test_root_without_dataset_names_expected_folder(tmp_path, plugin, expected):
    (tmp_path / "empty").mkdir()
    host = host_for(tmp_path, d={"plugin": plugin, "root": str(tmp_path / "empty")})
    with pytest.raises(InputError, match=expected) as err:
        host.dataset("d", "test")
    assert str(tmp_path / "empty") in str(err.value)


@pytest.mark.parametrize("root", ["", "/no/such/folder/t2ialign"])
def test_missing_root_says_how_to_set_it(tmp_path, root):
    host = host_for(tmp_path, d={"plugin": "ade20k", "root": root})
    with pytest.raises(InputError) as err:
        host.dataset("d", "test")
    assert "T2IALIGN_DATA" in str(err.value) and "--registry" in str(err.value)


def test_missing_files_and_folders_are_named(tmp_path):
    context = make_context(tmp_path, {"a": _label([2])})
    (context / "SegmentationClassContext" / "a.png").unlink()
    host = host_for(tmp_path, c={"plugin": "pascal_context", "root": str(context)})
    with pytest.raises(InputError, match=str(context / "SegmentationClassContext" / "a.png")):
        host.dataset("c", "test")
    ade = make_ade(tmp_path, {"b": _label([1])})
    host = host_for(tmp_path, a={"plugin": "ade20k", "root": str(ade)})
    with pytest.raises(InputError, match=str(ade / "annotations" / "training")):
        host.dataset("a", "train")


def test_mask_size_mismatch_names_both_files(tmp_path):
    voc = make_voc(tmp_path, {"x": _label([1])})
    _jpg(voc / "JPEGImages" / "x.jpg", h=H + 2, w=W)
    ds = host_for(tmp_path, v={"plugin": "voc", "root": str(voc)}).dataset("v", "test")
    with pytest.raises(InputError) as err:
        ds[0]
    assert str(voc / "JPEGImages" / "x.jpg") in str(err.value)
    assert str(voc / "SegmentationClass" / "x.png") in str(err.value)


def test_colour_mask_and_out_of_range_labels_are_refused(tmp_path):
    voc = make_voc(tmp_path, {"x": _label([1]), "y": _label([30])})
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(voc / "SegmentationClass" / "x.png")
    ds = host_for(tmp_path, v={"plugin": "voc", "root": str(voc)}).dataset("v", "test")
    with pytest.raises(InputError, match="colour"):
        ds[0]
    with pytest.raises(InputError, match=r"values \[30\]"):
        ds[1]


# --------------------------------------------------------------------------------------------
# image modes
# --------------------------------------------------------------------------------------------
def test_every_image_mode_loads_as_rgb_uint8(tmp_path):
    gray = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    cases = {}
    Image.fromarray(gray).save(tmp_path / "l.png")
    cases["l.png"] = np.repeat(gray[:, :, None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full((H, W, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    cases["rgba.png"] = rgb  # alpha dropped, colours untouched
    pal = Image.fromarray(gray)
    pal.putpalette([v for i in range(256) for v in (i, 255 - i, 3)])
    pal.save(tmp_path / "p.png")
    cases["p.png"] = np.stack([gray, 255 - gray, np.full_like(gray, 3)], axis=2)
    deep = (gray.astype(np.uint16) * 257)  # 16-bit: 65535 must map to 255, not clip
    Image.fromarray(deep).save(tmp_path / "i16.png")
    cases["i16.png"] = np.repeat(gray[:, :, None], 3, axis=2)
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    for name, expected in cases.items():
        out = read_rgb(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (H, W, 3), name
        np.testing.assert_array_equal(out, expected, err_msg=name)


def test_dataset_reads_non_rgb_images_in_jpg_slots(tmp_path):
    voc = make_voc(tmp_path, {"g": _label([1]), "a": _label([2])})
    gray = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(gray).save(voc / "JPEGImages" / "g.jpg", format="PNG")  # grayscale file
    Image.fromarray(np.zeros((H, W, 4), np.uint8)).save(voc / "JPEGImages" / "a.jpg", format="PNG")  # RGBA
    ds = host_for(tmp_path, v={"plugin": "voc", "root": str(voc)}).dataset("v", "test")
    np.testing.assert_array_equal(ds[0].image[:, :, 1], gray)
    assert ds[1].image.shape == (H, W, 3)


def test_read_label_keeps_16bit_values(tmp_path):
    lab = np.array([[0, 150], [300, 1]], dtype=np.uint16)
    Image.fromarray(lab).save(tmp_path / "l16.png")
    np.testing.assert_array_equal(read_label(tmp_path / "l16.png"), lab.astype(np.int64))


# --------------------------------------------------------------------------------------------
# candidate classes, subsets, prompt words
# --------------------------------------------------------------------------------------------
def test_labels_file_mode(tmp_path):
    voc = make_voc(tmp_path, {"x": _label([1]), "y": _label([2])})
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"x": ["people", 3, "aeroplane", "plane"], "y": []}))
    host = host_for(tmp_path, v={"plugin": "voc", "root": str(voc), "classes_from": "labels_file",
                                 "labels_file": str(labels)})
    ds = host.dataset("v", "test")
    assert ds[0].classes == [1, 3, 15]  # names, prompt words and ids; sorted, deduplicated
    assert ds[0].meta["gt_classes"] == [1]
    assert ds[1].classes == []
    labels.write_text(json.dumps({"x": ["unicorn"], "y": []}))
    with pytest.raises(InputError, match="unicorn"):
        host.dataset("v", "test")
    labels.write_text(json.dumps({"x": [1]}))
    with pytest.raises(InputError, match="'y' is missing"):
        host.dataset("v", "test")[1]
    no_file = host_for(tmp_path, v={"plugin": "voc", "root": str(voc), "classes_from": "labels_file"})
    with pytest.raises(ConfigError, match="labels_file"):
        no_file.dataset("v", "test")


def test_ids_file_and_limit(tmp_path):
    ids = [f"img{i}" for i in range(5)]
    ade = make_ade(tmp_path, {i: _label([k + 1]) for k, i in enumerate(ids)})
    subset = tmp_path / "val_id_3.txt"
    subset.write_text("img3\nimg0\n\nimg4\n")
    host = host_for(tmp_path,
                    sub={"plugin": "ade20k", "root": str(ade), "ids_file": str(subset)},
                    lim={"plugin": "ade20k", "root": str(ade), "ids_file": str(subset), "limit": 2},
                    bad={"plugin": "ade20k", "root": str(ade), "ids_file": str(tmp_path / "nope.txt")})
    assert [s.id for s in host.dataset("sub", "test")] == ["img3", "img0", "img4"]  # file order kept
    lim = host.dataset("lim", "test")
    assert [s.id for s in lim] == ["img3", "img0"] and lim[1].classes == [1]
    with pytest.raises(InputError, match="nope.txt"):
        host.dataset("bad", "test")
    subset.write_text("img1\nimg9\n")
    with pytest.raises(InputError, match="img9"):
        host.dataset("sub", "test")


def test_class_words_override(tmp_path):
    voc = make_voc(tmp_path, {"x": _label([1])})
    host = host_for(tmp_path, v={"plugin": "voc", "root": str(voc),
                                 "class_words": {"aeroplane": "airplane", "15": "person", "monitor": "tv"}})
    names = host.dataset("v", "test").class_names
    assert (names[1], names[15], names[20], names[2]) == ("airplane", "person", "tv", "bicycle")
    bad = host_for(tmp_path, v={"plugin": "voc", "root": str(voc), "class_words": {"dragon": "x"}})
    with pytest.raises(ConfigError, match="dragon"):
        bad.dataset("v", "test")


def test_registry_rejects_unknown_option(tmp_path):
    with pytest.raises(T2IAlignError, match="unknown key 'mask_dirr'"):
        host_for(tmp_path, v={"plugin": "voc", "root": "x", "mask_dirr": "auto"})
