"""Robustness (issue 9): bad inputs get clear errors, crashes lose nothing, plugins cannot take the host down.

One table (:data:`CASES`) of bad -- and awkward-but-valid -- inputs, run through the CLI in-process
(``t2ialign.core.cli.main``, exit code = return value, stderr captured) or through the Python
objects. Every failing case asserts the message (what, where, how to fix), the exit code and that
nothing partial was left in the output folder; every "must work" case asserts the outputs. The
first fragment of every case's expected message is a stable stem that ``docs/troubleshooting.md``
must document (checked by :func:`test_every_asserted_message_is_documented`).

Further tests: an internal error (a bug) becomes one line plus a traceback file; NaN injected into
the denoiser stops the run with the image id and stage and no ``results.json``; an evaluation killed
with SIGKILL resumes to the same ``results.json`` as an uninterrupted run (taking over the killed
run's lock); a live lock is refused, a stale one taken over; a torn JSON line is repaired.

Everything runs on a tiny random SD model and 2-6 toy scenes.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from t2ialign.core import errors as errors_module
from t2ialign.core.calibration import calibrate
from t2ialign.core.cli import main
from t2ialign.core.errors import InputError, NumericalError, T2IAlignError
from t2ialign.core.fileio import append_jsonl, read_jsonl, repair_jsonl
from t2ialign.core.host import Host
from t2ialign.core.pipeline import AlignmentPipeline, Variant, check_class_words
from t2ialign.core.tokens import find_token_span
from tests.helpers.tiny_models import cached_tiny_sd

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "troubleshooting.md"
#: a short schedule for the tiny model: the heatmap command's keys, then the evaluation's extra ones
FAST_HEATMAP = ["elbo.timesteps=[[1, 999, 250]]", "collect.timesteps=[[20, 101, 40]]", "collect.batch_size=2",
                "layers.cross_weight=[1, 1, 1, 1, 1]", "layers.self_weight=[[1, 0, 0, 0, 1], [0, 0, 0, 0, 1]]"]
FAST = [*FAST_HEATMAP, "bootstrap=50", "visuals=2"]


# --------------------------------------------------------------------------------------------
# the environment: tiny model, registries, images, dataset folders
# --------------------------------------------------------------------------------------------
@dataclass
class Env:
    root: Path
    registry: Path
    files: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, name: str) -> str:
        return str(self.files[name])


def _write_images(d: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    files = {}

    def save(name: str, img: Image.Image) -> None:
        files[name] = d / f"{name}.png"
        img.save(files[name])

    save("rgb", Image.fromarray(rgb))
    save("gray", Image.fromarray(rgb[:, :, 0]))
    save("rgba", Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (40, 50), dtype=np.uint8)])))
    save("palette", Image.fromarray(rgb).convert("P"))
    save("gray16", Image.fromarray(rng.integers(0, 65536, (40, 50)).astype(np.uint16)))
    assert Image.open(files["gray16"]).mode.startswith("I;16")
    save("wide", Image.fromarray(rng.integers(0, 256, (20, 90, 3), dtype=np.uint8)))
    save("tiny", Image.fromarray(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)))
    data = files["rgb"].read_bytes()
    files["truncated"] = d / "truncated.png"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["not_an_image"] = d / "not_an_image.png"
    files["not_an_image"].write_bytes(b"this is text, not a PNG")
    files["missing"] = d / "missing.png"
    return files


def _write_voc_mismatch(root: Path) -> Path:
    """A VOC2012 layout whose only image (8x6) has a 4x4 mask."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(voc / "JPEGImages" / "2007_000001.jpg")
    Image.fromarray(np.ones((4, 4), dtype=np.uint8)).save(voc / "SegmentationClass" / "2007_000001.png")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n")
    return voc


rng_big = np.random.default_rng(1)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("robust")
    model = cached_tiny_sd()
    (root / "not_voc").mkdir()
    (root / "not_voc" / "README.txt").write_text("some other dataset\n")
    voc = _write_voc_mismatch(root / "voc")
    reg = root / "reg.yaml"
    reg.write_text(
        "backbones:\n"
        f"  tiny: {{plugin: stable_diffusion, model: '{model}'}}\n"
        "  ghost: {plugin: stable_difusion, model: x}\n"
        "  boomer: {plugin: boom}\n"
        "datasets:\n"
        "  toy_small: {plugin: toy_shapes, n_val: 2, n_test: 2, image_size: 64}\n"
        "  toy_six: {plugin: toy_shapes, n_val: 2, n_test: 6, image_size: 64}\n"
        f"  voc_missing: {{plugin: voc, root: '{root / 'no' / 'such' / 'folder'}'}}\n"
        f"  voc_wrong: {{plugin: voc, root: '{root / 'not_voc'}'}}\n"
        f"  voc_mismatch: {{plugin: voc, root: '{voc}'}}\n"
        "  voc_unset: {plugin: voc, root: '${T2IALIGN_ROBUSTNESS_UNSET}/VOC2012'}\n"
    )
    files = _write_images(root)
    bad = {
        "reg_wrong_type": "backbones:\n  tiny: {cross_gaussian_sigma: wide}\n",
        "reg_no_plugin": "backbones:\n  newcomer: {model: /somewhere}\n",
        "reg_unknown_key": "backbones:\n  tiny: {modle: /somewhere}\n",
        "reg_python_tag": f"backbones: !!python/object/apply:os.mkdir ['{root / 'pwned'}']\n",
        "reg_bad_syntax": "backbones:\n  tiny: {plugin: stable_diffusion\n  other: 1\n",
        "config_python_tag": f"gamma: !!python/object/apply:os.mkdir ['{root / 'pwned'}']\n",
    }
    for name, text in bad.items():
        files[name] = root / f"{name}.yaml"
        files[name].write_text(text)
    files["a_file"] = root / "a_file.txt"
    files["a_file"].write_text("a file where a folder is expected\n")
    for name, text in {"config_list": "- gamma: 0.5\n- limit: 2\n", "config_scalar": "0.5\n",
                       "config_empty": "# nothing but a comment\n"}.items():
        files[name] = root / f"{name}.yaml"
        files[name].write_text(text)
    files["config_dir"] = root / "configs"
    files["config_dir"].mkdir()
    files["one_pixel"] = root / "one_pixel.png"
    Image.fromarray(np.full((1, 1, 3), 200, dtype=np.uint8)).save(files["one_pixel"])
    files["big"] = root / "big.png"  # a panel of full-size tiles would be 4 x 1200 = 4800 px wide
    Image.fromarray(rng_big.integers(0, 256, (900, 1200, 3), dtype=np.uint8)).save(files["big"])
    files["scene"] = root / "scene.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(files["scene"])
    return Env(root, reg, files)


def heatmap(env: Env, out: Path, image: str, *classes: str, extra: tuple[str, ...] = (),
            registries: tuple[str, ...] = ()) -> list[str]:
    regs = [a for r in (str(env.registry), *registries) for a in ("--registry", r)]
    return [*regs, "heatmap", env[image], "--classes", *classes, "--backbone", "tiny",
            "--output", str(out), *FAST_HEATMAP, *extra]


def edit(env: Env, out: Path, source: str, target: str, *extra: str) -> list[str]:
    return ["--registry", str(env.registry), "edit", env["scene"], "--source", source, "--target", target,
            "--backbone", "tiny", "--output", str(out), *extra]


def generate(env: Env, out: Path, *extra: str) -> list[str]:
    return ["--registry", str(env.registry), "generate", "a red star and a blue circle", "--backbone", "tiny",
            "--output", str(out), *extra]


def evaluate(env: Env, out: Path, *extra: str, dataset: str = "toy_small", backbone: str = "tiny",
             registries: tuple[str, ...] = ()) -> list[str]:
    regs = [a for r in (str(env.registry), *registries) for a in ("--registry", r)]
    return [*regs, "eval", "segmentation", "--backbone", backbone, "--dataset", dataset,
            "--output", str(out), *FAST, *extra]


def with_entry_points(monkeypatch, *extra: tuple[str, str, str]) -> None:
    """Pretend extra packages declare ``(name, 'module:attr', source)`` entry points."""
    from t2ialign.core import plugin_manager

    original = plugin_manager._entry_points
    monkeypatch.setattr(plugin_manager, "_entry_points", lambda: original() + list(extra))


BROKEN_IMPORT = ("broken_at_import", "tests.helpers.plugin_broken_at_import", "thirdparty-broken 0.1")
CALL_RAISER = ("faulty_call", "tests.helpers.faulty_plugins:CALL_RAISER", "thirdparty-faulty 0.1")
GREEDY = ("greedy", "tests.helpers.faulty_plugins:GREEDY", "thirdparty-greedy 0.1")


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One input. ``cli`` builds argv (run through ``main``) or ``api`` calls Python objects.

    ``code``: expected exit code (0 = must work; for API cases the raised error's ``exit_code``).
    ``says``: fragments of the message; the first is the stable stem documented in the docs.
    ``leaves``: output files a failed run may leave (the resume markers ``config.yaml`` and
    ``weights.json`` of a run that got past setup).
    ``check``: extra assertions on (env, output folder).
    """

    id: str
    code: int
    says: tuple[str, ...] = ()
    cli: Callable[[Env, Path], list[str]] | None = None
    api: Callable[[Env, Path], Any] | None = None
    error: type[T2IAlignError] | None = None
    leaves: frozenset[str] = frozenset()
    patch: Callable[[Any], None] | None = None
    check: Callable[[Env, Path], None] | None = None


def heatmap_matches_image(image: str, words: tuple[str, ...] = ("cat", "dog")):
    """A "must work" check: every word has a heatmap PNG of the image's own size, plus the panel."""

    def check(env: Env, out: Path) -> None:
        w, h = Image.open(env.files[image]).size
        for word in words:
            safe = "".join(c if c.isalnum() else "_" for c in word)
            for variant in ("baseline", "calibrated"):
                png = out / f"{image}_{safe}_{variant}.png"
                assert Image.open(png).size == (w, h), png
        assert (out / f"{image}_panel.png").is_file()
        summary = json.loads((out / f"{image}_heatmaps.json").read_text())
        assert summary["classes"] == list(words)
        assert all(np.isfinite(summary["scores"]["calibrated"]))

    return check


def heatmap_config_applies(env: Env, out: Path) -> None:
    """``key=value`` after --classes was an override, and config.yaml holds only what a heatmap uses."""
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["gamma"] == 0.5 and config["threshold"] == 0.4
    assert not {"dataset", "split", "limit", "metric", "bootstrap", "visuals"} & set(config), sorted(config)
    assert json.loads((out / "rgb_heatmaps.json").read_text())["classes"] == ["cat", "dog"]


def panel_is_capped(env: Env, out: Path) -> None:
    """Heatmaps stay full size; the panel's tiles are downsized (4 columns of <= 512 px)."""
    assert Image.open(out / "big_cat_calibrated.png").size == (1200, 900)
    w, h = Image.open(out / "big_panel.png").size
    assert w <= 4 * 512 + 5 * 20 and h <= 3 * (384 + 40) + 200, (w, h)


def results_json_is_strict(env: Env, out: Path) -> None:
    """No NaN token in any JSON file (Python's json would write one; no other reader accepts it)."""
    for path in out.rglob("*.json"):
        json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {path}"))


def no_code_ran(env: Env, out: Path) -> None:
    assert not (env.root / "pwned").exists(), "the YAML tag was executed"


def constant_maps(env: Env, out: Path) -> None:
    """Zero key projections of every cross-attention layer: softmax(q . 0) is uniform over tokens,
    so each class's cross-attention map is the same value at every pixel."""
    host = Host(registry_files=[env.registry])
    bb = host.backbone("tiny")
    zeroed = 0
    for name, module in bb.unet.named_modules():
        if name.endswith("attn2"):
            module.to_k.weight.data.zero_()
            zeroed += 1
    assert zeroed == 7
    pipe = AlignmentPipeline(bb, host.extractor(bb), host.weighting(bb.prediction_type, "uniform"),
                             elbo_timesteps=[[1, 999, 250]], collect_timesteps=[[20, 101, 40]],
                             cross_weight=[1, 1, 1, 1, 1], self_weight=[[1, 0, 0, 0, 1], [0, 0, 0, 0, 1]])
    image = np.asarray(Image.open(env.files["rgb"]).convert("RGB"))
    res = pipe.run(image, ["cat", "dog"], [Variant("baseline", 1.0), Variant("calibrated", 1 / 3)], key="const")
    for heat in res.heatmaps.values():
        assert torch.isfinite(heat).all()
        # an uninformative map carries no evidence for any pixel: all zero, never NaN
        assert float(heat.abs().max()) == 0.0
    return res


def constant_calibration(env: Env, out: Path) -> None:
    out_maps = calibrate(torch.full((2, 4, 4), 0.25), torch.tensor([1.0, 1 / 3]))
    assert torch.isfinite(out_maps).all() and float(out_maps.abs().max()) == 0.0


def elbo_nan(env: Env, out: Path) -> None:
    host = Host(registry_files=[env.registry])
    bb = host.backbone("tiny")
    predict = bb.predict

    def poisoned(z_t, t, cond):  # the ELBO grid reaches t = 251..751, the collect grid stops at 100
        pred = predict(z_t, t, cond)
        return pred * float("nan") if float(torch.as_tensor(t).max()) > 200 else pred

    bb.predict = poisoned
    pipe = AlignmentPipeline(bb, host.extractor(bb), host.weighting(bb.prediction_type, "uniform"),
                             elbo_timesteps=[[1, 999, 250]], collect_timesteps=[[20, 101, 40]],
                             cross_weight=[1, 1, 1, 1, 1], self_weight=[[1, 0, 0, 0, 1], [0, 0, 0, 0, 1]])
    image = np.asarray(Image.open(env.files["rgb"]).convert("RGB"))
    pipe.run(image, ["cat", "dog"], [Variant("baseline", 1.0), Variant("calibrated", 1 / 3)], key="img7")


CASES: list[Case] = [
    # ---- images
    Case("missing_image", 2, ("image not found", "missing.png", "how to fix: check the path"),
         cli=lambda e, o: heatmap(e, o, "missing", "cat", "dog")),
    Case("truncated_png", 2, ("cannot read image", "truncated", "re-export it"),
         cli=lambda e, o: heatmap(e, o, "truncated", "cat", "dog")),
    Case("not_an_image", 2, ("cannot read image", "cannot identify image file", "re-export it"),
         cli=lambda e, o: heatmap(e, o, "not_an_image", "cat", "dog")),
    Case("grayscale_works", 0, cli=lambda e, o: heatmap(e, o, "gray", "cat", "dog"),
         check=heatmap_matches_image("gray")),
    Case("rgba_works", 0, cli=lambda e, o: heatmap(e, o, "rgba", "cat", "dog"), check=heatmap_matches_image("rgba")),
    Case("palette_works", 0, cli=lambda e, o: heatmap(e, o, "palette", "cat", "dog"),
         check=heatmap_matches_image("palette")),
    Case("16bit_works", 0, cli=lambda e, o: heatmap(e, o, "gray16", "cat", "dog"),
         check=heatmap_matches_image("gray16")),
    Case("non_square_works", 0, cli=lambda e, o: heatmap(e, o, "wide", "cat", "dog"),
         check=heatmap_matches_image("wide")),
    Case("tiny_image_works", 0, cli=lambda e, o: heatmap(e, o, "tiny", "cat", "dog"),
         check=heatmap_matches_image("tiny")),
    Case("one_pixel_image_works", 0, cli=lambda e, o: heatmap(e, o, "one_pixel", "cat", "dog"),
         check=heatmap_matches_image("one_pixel")),
    Case("large_image_panel_capped", 0, cli=lambda e, o: heatmap(e, o, "big", "cat", "dog"), check=panel_is_capped),
    # ---- class words
    Case("empty_class_list_cli", 2, ("expected at least one argument", "--classes"),
         cli=lambda e, o: heatmap(e, o, "rgb")),
    Case("empty_class_list_api", 2, ("the class list is empty", "how to fix: give at least one class word"),
         api=lambda e, o: check_class_words([], where="my call"), error=InputError),
    Case("duplicate_classes", 2, ("duplicate class words", "['cat']", "give each class once"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", "dog", "cat")),
    Case("empty_class_word", 2, ("is empty", "class word 2", "in --classes"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", "  ")),
    Case("invisible_characters", 2, ("contains invisible control/format characters", "U+200B", "retype"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", "do\u200bg")),
    Case("untokenisable_word", 2, ("contains text the tokenizer does not know", "zebra", "<unk>"),
         api=lambda e, o: find_token_span(__import__("tests.helpers.tiny_sd3", fromlist=["x"]).tiny_t5_tokenizer(),
                                          "a photo of zebra", "zebra"),
         error=InputError),
    Case("prompt_over_token_limit", 2, ("prompt too long", "only reads 77 tokens", "use fewer classes"),
         cli=lambda e, o: heatmap(e, o, "rgb", *[f"word{i}" for i in range(40)])),
    Case("key_value_after_classes_is_an_override", 0,
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", "dog", "gamma=1/2"), check=heatmap_config_applies),
    Case("key_value_after_classes_checked_as_override", 2, ("must be a number", "config key 'gamma'", "'1/0'"),
         cli=lambda e, o: heatmap(e, o, "rgb", "circle", "square", "gamma=1/0")),
    Case("only_overrides_after_classes", 2, ("is a key=value override, not a word", "--classes cat dog gamma=1/2"),
         cli=lambda e, o: heatmap(e, o, "rgb", "gamma=1/2")),
    Case("punctuation_and_unicode_work", 0,
         cli=lambda e, o: heatmap(e, o, "rgb", "o'neil", "café", "日本", "a-b", "a_b", "..."),
         check=lambda e, o: _distinct_heatmaps(o, 6)),
    # ---- maps and numerics
    Case("constant_attention_maps", 0, api=constant_maps),
    Case("constant_map_calibration", 0, api=constant_calibration),
    Case("nan_in_elbo_pass", 3, ("NaN/Inf", "item img7", "ELBO engine"), api=elbo_nan, error=NumericalError),
    # ---- datasets
    Case("mask_image_size_mismatch", 2, ("but image", "is 4x4", "is 8x6 (width x height)", "does not belong to this image"),
         cli=lambda e, o: evaluate(e, o, "threshold.mode=fixed", dataset="voc_mismatch"),
         check=lambda e, o: (not o.exists()) or pytest.fail(f"left {sorted(o.rglob('*'))}")),
    Case("dataset_root_missing", 2, ("does not exist", "dataset root", "T2IALIGN_DATA"),
         cli=lambda e, o: evaluate(e, o, dataset="voc_missing")),
    Case("dataset_wrong_layout", 2, ("found in any of", "'JPEGImages'", "VOC2012 layout"),
         cli=lambda e, o: evaluate(e, o, dataset="voc_wrong")),
    Case("dataset_root_variable_unset", 2, ("is not set", "T2IALIGN_ROBUSTNESS_UNSET", "export"),
         cli=lambda e, o: evaluate(e, o, dataset="voc_unset")),
    # ---- registry and config
    Case("unknown_backbone_name", 2, ("no backbone named", "'tinyy'", "did you mean 'tiny'"),
         cli=lambda e, o: evaluate(e, o, backbone="tinyy")),
    Case("registry_unknown_plugin", 2, ("no loaded plugin provides", "'stable_difusion'",
                                        "did you mean 'stable_diffusion'"),
         cli=lambda e, o: evaluate(e, o, backbone="ghost")),
    Case("registry_wrong_type", 2, ("must be a number", "key 'cross_gaussian_sigma'", "got a string", "reg_wrong_type.yaml"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", registries=(e["reg_wrong_type"],))),
    Case("registry_missing_plugin_key", 2, ("has no 'plugin' key", "newcomer", "add 'plugin: NAME'"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", registries=(e["reg_no_plugin"],))),
    Case("registry_unknown_key", 2, ("unknown key", "'modle'", "did you mean 'model'"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", registries=(e["reg_unknown_key"],))),
    Case("registry_python_tag", 2, ("uses a YAML tag that safe loading refuses", "python/object", "remove python/object tags"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", registries=(e["reg_python_tag"],)), check=no_code_ran),
    Case("config_python_tag", 2, ("uses a YAML tag that safe loading refuses", "config file", "line 1"),
         cli=lambda e, o: evaluate(e, o, "--config", e["config_python_tag"]), check=no_code_ran),
    Case("registry_bad_syntax", 2, ("is not valid YAML", "reg_bad_syntax.yaml, line", "fix the YAML syntax"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", registries=(e["reg_bad_syntax"],))),
    Case("override_unknown_key", 2, ("unknown config key", "'gama'", "did you mean 'gamma'"),
         cli=lambda e, o: evaluate(e, o, "gama=0.5")),
    Case("override_wrong_type", 2, ("must be an integer", "config key 'bootstrap'", "got a string", "bootstrap=1000"),
         cli=lambda e, o: evaluate(e, o, "bootstrap=many")),
    Case("gamma_out_of_range", 2, ("gamma must lie in (0, 1]", "got 2.0", "gamma=1/3"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", "dog", extra=("gamma=2",))),
    Case("gamma_option_out_of_range", 2, ("must be a finite number in", "argument --gamma", "(0, 1]", "--gamma 1/3"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", "dog", extra=("--gamma", "2"))),
    Case("threshold_option_out_of_range", 2, ("must be a finite number in", "argument --threshold", "got '2'"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", "dog", extra=("--threshold", "2"))),
    Case("threshold_option_nan", 2, ("must be a finite number in", "argument --threshold", "got 'nan'"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", "dog", extra=("--threshold", "nan"))),
    Case("threshold_override_nan", 2, ("threshold must be a finite number in [0, 1]", "config key threshold", "nan"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", "dog", extra=("threshold=.nan",))),
    Case("fixed_threshold_nan", 2, ("threshold.value must be a finite number in [0, 1]", "got nan",
                                    "threshold.value=0.5"),
         cli=lambda e, o: evaluate(e, o, "threshold.mode=fixed", "threshold.value=.nan")),
    Case("blend_threshold_out_of_range", 2, ("blend.threshold must be a finite number in [0, 1]", "got 2",
                                             "config key blend.threshold"),
         cli=lambda e, o: edit(e, o, "a red circle", "a blue circle", "blend.threshold=2")),
    Case("guidance_option_nan", 2, ("must be a finite number in", "argument --guidance", "got 'nan'"),
         cli=lambda e, o: generate(e, o, "--guidance", "nan")),
    Case("guidance_override_nan", 2, ("guidance must be a finite number >= 0", "config key guidance", "guidance=7.5"),
         cli=lambda e, o: generate(e, o, "guidance=.nan")),
    Case("strength_override_inf", 2, ("strength must be a finite number >= 1", "config key strength", "strength=1.2"),
         cli=lambda e, o: generate(e, o, "strength=.inf")),
    Case("edit_word_not_in_caption", 2, ("word 'dragon' is not in the source caption", "'a red circle and a star'",
                                         "--edit-words", "one of ["),
         cli=lambda e, o: edit(e, o, "a red circle and a star", "a blue circle and a star",
                               "--edit-words", "dragon", "steps=4")),
    Case("object_word_not_in_caption", 2, ("is not in the source caption", "word 'square'", "--words"),
         cli=lambda e, o: edit(e, o, "a red circle", "a blue circle", "--words", "circle", "square")),
    Case("edit_same_caption", 2, ("the source and target captions are the same", "nothing to edit", "--target"),
         cli=lambda e, o: edit(e, o, "a red circle", "a  red circle")),
    Case("config_is_a_folder", 2, ("is a folder, not a file", "configs", "--config", "config.yaml"),
         cli=lambda e, o: evaluate(e, o, "--config", e["config_dir"])),
    Case("config_is_a_list", 2, ("expected a mapping, got a list", "config_list.yaml", "how to fix: a config file holds"),
         cli=lambda e, o: evaluate(e, o, "--config", e["config_list"])),
    Case("config_is_a_scalar", 2, ("expected a mapping, got", "got a number", "config_scalar.yaml", "how to fix:"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", extra=("--config", e["config_scalar"]))),
    Case("config_is_empty", 2, ("is empty", "config_empty.yaml", "leave --config out"),
         cli=lambda e, o: evaluate(e, o, "--config", e["config_empty"])),
    Case("bad_prompt_template", 2, ("cannot be filled in", "KeyError", "collect.prompt"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", extra=("collect.prompt=a photo of {classes} {oops}",))),
    Case("limit_not_positive", 2, ("must be a positive number of images", "limit", "limit=20"),
         cli=lambda e, o: evaluate(e, o, "limit=0")),
    Case("unknown_dtype", 2, ("unknown dtype", "'float8'", "use one of"),
         cli=lambda e, o: evaluate(e, o, "dtype=float8")),
    Case("device_not_available", 2, ("is not available:", "device 'cuda:7'", "config key device", "how to fix: use"),
         cli=lambda e, o: evaluate(e, o, "--device", "cuda:7")),
    Case("missing_config_file", 2, ("config file not found", "nope.yaml", "check the path"),
         cli=lambda e, o: evaluate(e, o, "--config", str(e.root / "nope.yaml"))),
    # the parser refuses it ("invalid choice") or, with a third-party plugin installed that might add
    # tasks, the host does ("no task named"); either way the message names the typo and the fix
    Case("unknown_task", 2, ("segmentaton", "segmentation"),
         cli=lambda e, o: ["--registry", str(e.registry), "eval", "segmentaton", "--output", str(o)]),
    # ---- runs
    Case("results_are_strict_json", 0, cli=lambda e, o: evaluate(e, o, "limit=1", "threshold.limit=1"),
         check=results_json_is_strict),
    Case("output_is_an_existing_file", 2, ("is an existing file, not a folder", "a_file.txt", "--output"),
         cli=lambda e, o: heatmap(e, e.files["a_file"], "rgb", "cat"),
         check=lambda e, o: (e.files["a_file"].read_text() == "a file where a folder is expected\n") or pytest.fail()),
    Case("output_not_writable", 2, ("is not writable", "a_file.txt", "choose another folder with --output"),
         cli=lambda e, o: heatmap(e, e.files["a_file"] / "out", "rgb", "cat")),
    # ---- plugins
    Case("plugin_import_error_host_survives", 0,
         ("failed to load", "broken_at_import", "RuntimeError: this plugin is broken on purpose"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat", "dog"),
         patch=lambda mp: with_entry_points(mp, BROKEN_IMPORT), check=heatmap_matches_image("rgb")),
    Case("plugin_import_error_strict", 1, ("failed to load", "broken_at_import"),
         cli=lambda e, o: ["plugins", "--strict"], patch=lambda mp: with_entry_points(mp, BROKEN_IMPORT)),
    Case("plugin_raises_at_call", 2, ("while building", "plugin 'faulty_call' raised RuntimeError", "kaboom",
                                      "-p no:faulty_call"),
         cli=lambda e, o: evaluate(e, o, backbone="boomer"), patch=lambda mp: with_entry_points(mp, CALL_RAISER)),
    Case("plugin_raises_for_everything", 2, ("while building", "plugin 'greedy' raised ZeroDivisionError",
                                             "-p no:greedy"),
         cli=lambda e, o: heatmap(e, o, "rgb", "cat"), patch=lambda mp: with_entry_points(mp, GREEDY)),
    Case("raising_plugin_disabled", 0, cli=lambda e, o: ["-p", "no:greedy", *heatmap(e, o, "rgb", "cat", "dog")],
         patch=lambda mp: with_entry_points(mp, GREEDY), check=heatmap_matches_image("rgb")),
    Case("disable_unknown_plugin", 2, ("cannot disable unknown plugin", "['nonexistent']", "t2ialign plugins"),
         cli=lambda e, o: ["-p", "no:nonexistent", "plugins"]),
]


def _distinct_heatmaps(out: Path, n_words: int) -> None:
    # "a-b" and "a_b" clean to the same file stem: each word must still get its own file
    maps = sorted(out.glob("rgb_*_calibrated.png"))
    assert len(maps) == n_words, maps


def partial_outputs(out: Path, allowed: frozenset[str]) -> list[str]:
    """Files in ``out`` a failed run should not have left (anything but ``allowed``)."""
    if not out.exists():
        return []
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    return [f for f in files if f not in allowed]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, env: Env, tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    if case.patch is not None:
        case.patch(monkeypatch)
    if case.cli is not None:
        code = main(case.cli(env, out))
        err = capsys.readouterr().err
        assert code == case.code, err
        assert "Traceback" not in err and "internal error" not in err, err
        message = err
    else:
        if case.code == 0:
            case.api(env, out)
            message = ""
        else:
            with pytest.raises(case.error) as info:
                case.api(env, out)
            assert info.value.exit_code == case.code
            message = str(info.value)
            assert "how to fix:" in message or "in " in message
    for fragment in case.says:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    if case.code != 0:
        assert not partial_outputs(out, case.leaves), partial_outputs(out, case.leaves)
        assert not (out / "results.json").exists()
    if case.check is not None:
        case.check(env, out)
    if out.exists():  # neither failures nor successes leave temp files or locks behind
        hidden = [p.name for p in out.rglob(".*")]
        assert not hidden, hidden


def test_table_is_large_enough() -> None:
    failing = [c for c in CASES if c.code != 0]
    assert len(CASES) >= 20 and len(failing) >= 20
    assert all(c.says for c in failing), [c.id for c in failing if not c.says]


# --------------------------------------------------------------------------------------------
# docs stay in sync
# --------------------------------------------------------------------------------------------
def test_every_asserted_message_is_documented() -> None:
    doc = DOC.read_text(encoding="utf-8")
    stems = [c.says[0] for c in CASES if c.says]
    stems += ["NaN/Inf values in", "another run (pid", "internal error", "holds a run made with different"]
    missing = [s for s in stems if s not in doc]
    assert not missing, f"docs/troubleshooting.md does not mention: {missing}"
    classes = [name for name, obj in inspect.getmembers(errors_module, inspect.isclass)
               if issubclass(obj, T2IAlignError)]
    assert len(classes) >= 8
    undocumented = [name for name in classes if f"`{name}`" not in doc]
    assert not undocumented, undocumented


# --------------------------------------------------------------------------------------------
# bugs: one line and a traceback file
# --------------------------------------------------------------------------------------------
def test_internal_error_is_one_line_and_a_traceback_file(monkeypatch, tmp_path, capsys) -> None:
    import tempfile

    from t2ialign.core import cli

    def buggy(args, host):
        return 1 // 0

    monkeypatch.setattr(cli, "cmd_plugins", buggy)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = main(["plugins"])
    err = capsys.readouterr().err
    assert code == 1
    assert "internal error: ZeroDivisionError: integer division or modulo by zero" in err
    assert "Traceback" not in err
    match = re.search(r"traceback was written to (\S+)", err)
    assert match, err
    report = Path(match.group(1))
    assert report.parent == tmp_path and report.name.startswith("t2ialign-crash-")
    text = report.read_text()
    assert "Traceback (most recent call last)" in text and "in buggy" in text
    assert "command: t2ialign plugins" in text


# --------------------------------------------------------------------------------------------
# numerics: NaN in the denoiser stops the run with image id and stage, resumable
# --------------------------------------------------------------------------------------------
def test_nan_in_predict_names_image_and_stage(env: Env, tmp_path: Path, capsys, monkeypatch) -> None:
    from t2ialign.plugins.backbones.stable_diffusion import StableDiffusionBackbone

    host = Host(registry_files=[env.registry])
    bad_id = host.dataset("toy_small", "test")[1].id
    current = {"key": ""}
    run, predict = AlignmentPipeline.run, StableDiffusionBackbone.predict

    def tracking_run(self, image, words, variants, key="image"):
        current["key"] = key
        return run(self, image, words, variants, key=key)

    def poisoned_predict(self, z_t, t, cond):
        out = predict(self, z_t, t, cond)
        return out * float("nan") if current["key"].endswith(f"/eval/{bad_id}") else out

    monkeypatch.setattr(AlignmentPipeline, "run", tracking_run)
    monkeypatch.setattr(StableDiffusionBackbone, "predict", poisoned_predict)
    out = tmp_path / "run"
    code = main(evaluate(env, out))
    err = capsys.readouterr().err
    assert code == 3, err
    assert "NaN/Inf values in the attention-collection forward pass" in err
    assert f"item toy_small/eval/{bad_id}" in err and "float32" in err
    assert not (out / "results.json").exists()
    assert not (out / ".t2ialign.lock").exists()
    # the run stopped at the bad image; finished images are kept and a rerun resumes after them
    done = [r["id"] for r in read_jsonl(out / "records.eval.rank0.jsonl")]
    assert bad_id not in done and len(done) == 1
    monkeypatch.undo()
    assert main(evaluate(env, out)) == 0
    assert [r["id"] for r in read_jsonl(out / "records.eval.rank0.jsonl")] == [done[0], bad_id]
    assert json.loads((out / "results.json").read_text())["images"] == 2


# --------------------------------------------------------------------------------------------
# crash safety
# --------------------------------------------------------------------------------------------
# The real CLI entry, with every image slowed down so that a kill reliably lands mid-run.
SLOW_CLI = """
import sys, time
from t2ialign.core import pipeline
_run = pipeline.AlignmentPipeline.run
def slow(self, *args, **kwargs):
    time.sleep(float(sys.argv[1]))
    return _run(self, *args, **kwargs)
pipeline.AlignmentPipeline.run = slow
from t2ialign.core.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _cli_process(env: Env, out: Path, delay: float) -> subprocess.Popen:
    envvars = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    argv = evaluate(env, out, "visuals=0", "bootstrap=20", dataset="toy_six")
    # Ctrl-C as in a terminal: a test suite started as a background job (``cmd &``, nohup) runs
    # with SIGINT ignored, the child would inherit that, and Python keeps an inherited ignore
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, str(delay), *argv],
                            env=envvars, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _comparable(results: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in results.items() if k not in ("timings", "processes")}


def test_sigkill_then_rerun_equals_uninterrupted_run(env: Env, tmp_path: Path) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    records = killed / "records.eval.rank0.jsonl"
    proc = _cli_process(env, killed, delay=0.4)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and records.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()  # reaped: the pid in its lock is now dead
    proc.stdout.close()
    proc.stderr.close()
    assert (killed / ".t2ialign.lock").exists(), "the killed run's lock should still be there"
    assert not (killed / "results.json").exists()
    n_before = len(list(read_jsonl(records)))
    assert 2 <= n_before < 6

    rerun = _cli_process(env, killed, delay=0.0)
    out_text, err_text = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err_text[-3000:]
    whole = _cli_process(env, clean, delay=0.0)
    _, err_clean = whole.communicate(timeout=300)
    assert whole.returncode == 0, err_clean[-3000:]

    ids = [r["id"] for r in read_jsonl(records)]
    assert len(ids) == 6 and len(set(ids)) == 6  # nothing lost, nothing done twice
    r_killed = json.loads((killed / "results.json").read_text())
    r_clean = json.loads((clean / "results.json").read_text())
    assert _comparable(r_killed) == _comparable(r_clean)
    assert not (killed / ".t2ialign.lock").exists()
    assert not [p.name for p in killed.rglob("*.tmp")]


def test_sigint_mid_run_keeps_records_and_releases_the_lock(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    records = out / "records.eval.rank0.jsonl"
    proc = _cli_process(env, out, delay=0.4)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and records.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert not (out / ".t2ialign.lock").exists(), "Ctrl-C must release the lock"
    kept = [r["id"] for r in read_jsonl(records)]
    assert 2 <= len(kept) < 6 and records.read_text().endswith("\n")  # whole lines only
    assert (out / "config.yaml").is_file() and not (out / "results.json").exists()
    rerun = _cli_process(env, out, delay=0.0)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    ids = [r["id"] for r in read_jsonl(records)]
    assert ids[: len(kept)] == kept and len(ids) == 6 and len(set(ids)) == 6


def test_third_party_progress_bars_quiet_unless_verbose(env: Env, tmp_path: Path, capfd) -> None:
    from t2ialign.core import console

    try:
        assert main(heatmap(env, tmp_path / "quiet", "rgb", "cat", "dog")) == 0
        quiet = capfd.readouterr().err
        assert main(["-v", *heatmap(env, tmp_path / "loud", "rgb", "cat", "dog")]) == 0
        loud = capfd.readouterr().err
    finally:
        console.configure(verbose=True)  # the library defaults for the tests that follow
    assert "Loading weights" not in quiet and "it/s" not in quiet, quiet
    assert "Loading weights" in loud


def test_json_files_never_hold_nan(tmp_path: Path) -> None:
    from t2ialign.core.fileio import atomic_write_json

    atomic_write_json(tmp_path / "r.json", {"miou": float("nan"), "per_class": [1.0, float("inf")],
                                            "arr": np.array([np.nan, 2.0], dtype=np.float32)})
    append_jsonl(tmp_path / "r.jsonl", {"psnr": float("-inf"), "n": np.int64(3)})
    strict = {"parse_constant": lambda c: pytest.fail(f"{c} written")}
    assert json.loads((tmp_path / "r.json").read_text(), **strict) == {"miou": None, "per_class": [1.0, None],
                                                                       "arr": [None, 2.0]}
    assert [json.loads(line, **strict) for line in (tmp_path / "r.jsonl").read_text().splitlines()] == [
        {"n": 3, "psnr": None}]


def test_live_lock_is_refused_and_stale_lock_taken_over(env: Env, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".t2ialign.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}))
    assert main(evaluate(env, out, "limit=1", "threshold.limit=1")) == 2
    err = capsys.readouterr().err
    assert f"another run (pid {os.getpid()} on {socket.gethostname()}) is writing to this output folder" in err
    assert f"delete {lock}" in err
    assert lock.exists() and not (out / "results.json").exists() and not (out / "config.yaml").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "time": time.time()}))
    assert main(evaluate(env, out, "limit=1", "threshold.limit=1")) == 0
    assert (out / "results.json").is_file() and not lock.exists()


def test_failed_setup_does_not_block_the_corrected_rerun(env: Env, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(evaluate(env, out, "limit=1", "threshold.limit=1", backbone="tinyy")) == 2
    assert main(evaluate(env, out, "limit=1", "threshold.limit=1")) == 0
    assert "holds a run made with different" not in capsys.readouterr().err


def test_torn_record_line_is_cut_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "records.eval.rank0.jsonl"
    append_jsonl(path, {"id": "a"})
    with open(path, "a") as fh:
        fh.write('{"id": "b", "sco')  # what a kill in the middle of a write leaves
    assert [r["id"] for r in read_jsonl(path)] == ["a"]
    assert repair_jsonl(path) is True
    append_jsonl(path, {"id": "b"})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    assert repair_jsonl(path) is False
