"""Tests of the ``toy_shapes`` world: determinism, disjoint splits, exact masks and the baked-in biases."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from t2ialign.core.errors import ConfigError, InputError
from t2ialign.core.host import Host
from t2ialign.core.protocols import Dataset
from t2ialign.plugins.toy.dataset import make_toy_shapes
from t2ialign.plugins.toy.world import (
    CLASS_NAMES,
    COLOURS,
    SPLIT_CODE,
    STREAM_CODE,
    WorldConfig,
    caption,
    compositional_prompts,
    object_phrase,
    shape_mask,
    split_entropy,
)


def _objects(ds, n):
    return [o for i in range(n) for o in ds[i].meta["objects"]]


def _digest(sample) -> str:
    return hashlib.sha1(sample.image.tobytes() + sample.mask.tobytes()).hexdigest()


def test_same_seed_same_scene_and_other_seed_differs():
    a = make_toy_shapes({"seed": 3}, "train")
    b = make_toy_shapes({"seed": 3}, "train")
    c = make_toy_shapes({"seed": 4}, "train")
    for i in (0, 7, 123):
        sa, sb = a[i], b[i]
        assert np.array_equal(sa.image, sb.image) and np.array_equal(sa.mask, sb.mask)
        assert sa.prompt == sb.prompt and sa.meta == sb.meta
    assert [_digest(a[i]) for i in range(20)] != [_digest(c[i]) for i in range(20)]
    # random access: an item does not depend on which items were generated before it
    assert _digest(make_toy_shapes({"seed": 3}, "train")[123]) == _digest(a[123])


def test_splits_are_disjoint():
    digests = {split: {_digest(make_toy_shapes({}, split)[i]) for i in range(150)} for split in ("train", "val", "test")}
    assert all(len(d) == 150 for d in digests.values())
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


def test_extra_streams_are_disjoint_from_the_splits_and_from_each_other():
    """stream<k> scenes never repeat a train/val/test scene nor another stream's (the study relies on it)."""
    splits = ("train", "val", "test", "stream0", "stream1", "stream2")
    digests = {split: {_digest(make_toy_shapes({}, split)[i]) for i in range(120)} for split in splits}
    assert all(len(d) == 120 for d in digests.values())
    for a in splits:
        for b in splits:
            if a < b:
                assert not digests[a] & digests[b], (a, b)
    # a stream is as deterministic as a split, sized by n_stream, and named in its sample ids
    ds = make_toy_shapes({"n_stream": 7}, "stream3")
    assert len(ds) == 7 and ds[2].id == "stream3_000002"
    assert _digest(ds[2]) == _digest(make_toy_shapes({}, "stream3")[2])


def test_stream_entropy_cannot_collide_with_a_split():
    """SeedSequence pads entropy with zero words, so [s, c, i] == [s, c, i, 0]: the family word keeps them apart."""
    assert np.random.SeedSequence([0, 1, 5]).generate_state(4).tolist() == \
        np.random.SeedSequence([0, 1, 5, 0]).generate_state(4).tolist()  # the padding the design guards against
    assert STREAM_CODE not in SPLIT_CODE.values()
    assert split_entropy(0, "val", 5) == [0, SPLIT_CODE["val"], 5]
    assert split_entropy(0, "stream1", 5) == [0, STREAM_CODE, 1, 5]
    states = {tuple(np.random.SeedSequence(split_entropy(0, s, i)).generate_state(4))
              for s in ("train", "val", "test", "stream0", "stream1") for i in range(50)}
    assert len(states) == 250
    with pytest.raises(ConfigError, match="32 bits"):
        split_entropy(2 ** 32, "stream0", 0)


@pytest.mark.parametrize("name", ["stream", "stream-1", "stream01", "streamx", "Stream0", "holdout"])
def test_unknown_split_names_are_refused_with_the_stream_form_in_the_fix(name):
    with pytest.raises(InputError) as err:
        make_toy_shapes({}, name)
    assert "stream0" in str(err.value)


def test_sample_layout_and_masks_match_object_records():
    ds = make_toy_shapes({}, "val")
    for i in range(60):
        s = ds[i]
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (64, 64) and s.mask.dtype == np.int64
        assert s.classes == sorted({o["class_id"] for o in s.meta["objects"]})
        assert set(np.unique(s.mask)) - {0} == set(s.classes)
        # repaint the scene from its records alone: the mask must come out identical
        instance = np.zeros((64, 64), dtype=np.int64)
        for k, o in enumerate(s.meta["objects"]):
            full = shape_mask(o["shape"], *o["center"], o["radius"], o["angle"], 64)
            assert full.sum() == o["full_area"]
            instance[full] = k + 1
        labels = np.array([0] + [o["class_id"] for o in s.meta["objects"]])
        assert np.array_equal(labels[instance], s.mask)
        for k, o in enumerate(s.meta["objects"]):
            visible = int((instance == k + 1).sum())
            assert visible == o["area"] > 0
            assert o["occluded_fraction"] == pytest.approx(1 - visible / o["full_area"])
            assert CLASS_NAMES[o["class_id"] - 1] == o["shape"] and o["colour"] in COLOURS


def test_class_frequencies_follow_the_zipf_bias():
    ds = make_toy_shapes({"n_train": 1500}, "train")
    objs = _objects(ds, 1500)
    assert len(objs) > 3000
    counts = np.bincount([o["class_id"] for o in objs], minlength=len(CLASS_NAMES) + 1)[1:]
    freq = counts / counts.sum()
    expected = WorldConfig().class_probs
    assert freq.min() <= 0.03 and freq[-1] <= 0.03  # the rarest class is rare
    assert freq[0] > 0.3  # and the head class dominates
    assert np.abs(freq - expected).max() < 0.025
    uniform = make_toy_shapes({"zipf_exponent": 0.0}, "train")
    counts_u = np.bincount([o["class_id"] for o in _objects(uniform, 800)], minlength=11)[1:]
    assert counts_u.min() / counts_u.sum() > 0.06


def test_small_and_occluded_objects_are_present_and_controlled():
    objs = _objects(make_toy_shapes({}, "train"), 600)
    small = np.mean([o["size"] == "small" for o in objs])
    assert 0.15 < small < 0.35
    small_area = np.median([o["full_area"] for o in objs if o["size"] == "small"])
    normal_area = np.median([o["full_area"] for o in objs if o["size"] == "normal"])
    assert small_area * 4 < normal_area
    occluded = [o["occluded_fraction"] for o in objs]
    assert np.mean(np.array(occluded) > 0.1) > 0.05
    assert max(occluded) <= 1 - WorldConfig().min_visible_fraction + 1e-9

    none_small = _objects(make_toy_shapes({"small_object_prob": 0.0}, "train"), 200)
    assert not any(o["size"] == "small" for o in none_small)
    low = _objects(make_toy_shapes({"occlusion_prob": 0.0}, "train"), 300)
    high = _objects(make_toy_shapes({"occlusion_prob": 0.9}, "train"), 300)
    assert np.mean([o["occluded_fraction"] for o in high]) > 3 * np.mean([o["occluded_fraction"] for o in low])


def test_captions_mention_every_object_with_its_attributes():
    ds = make_toy_shapes({}, "test")
    for i in range(100):
        s = ds[i]
        assert s.prompt.startswith("a photo of ")
        for o in s.meta["objects"]:
            assert object_phrase(o) in s.prompt
        assert ("small" in s.prompt) == any(o["size"] == "small" for o in s.meta["objects"])


def test_dataset_through_the_host(tmp_path):
    reg = tmp_path / "reg.yaml"
    reg.write_text("datasets:\n  toy:\n    plugin: toy_shapes\n    n_val: 7\n    seed: 5\n"
                   "  toy_bad:\n    plugin: toy_shapes\n    image_size: 32\n")
    host = Host(registry_files=[reg])
    ds = host.dataset("toy", "val")
    assert isinstance(ds, Dataset)
    assert len(ds) == 7 and ds.split == "val" and ds.name == "toy"
    assert ds.class_names == ["background", *CLASS_NAMES]
    assert ds[-1].id == "val_000006"
    with pytest.raises(IndexError):
        ds[7]
    with pytest.raises(InputError, match="unknown split"):
        host.dataset("toy", "training")
    with pytest.raises(ConfigError, match="image_size"):
        host.dataset("toy_bad", "val")


def test_compositional_prompts_bind_distinct_attributes():
    prompts = compositional_prompts(50, seed=1)
    assert prompts == compositional_prompts(50, seed=1) and prompts != compositional_prompts(50, seed=2)
    assert len(prompts) == 50
    for p in prompts:
        parts = p.replace(" and ", ", ").split(", ")
        assert 2 <= len(parts) <= 3
        colours = [w.split()[1] for w in parts]
        shapes = [w.split()[2] for w in parts]
        assert set(colours) <= set(COLOURS) and len(set(colours)) == len(colours)
        assert set(shapes) <= set(CLASS_NAMES) and len(set(shapes)) == len(shapes)


def test_a_split_offers_the_world_vocabulary_and_caption_rule():
    """What a task given the dataset by the host can use instead of importing the toy package."""
    ds = make_toy_shapes({"n_test": 5}, "test")
    assert ds.shape_names == CLASS_NAMES == ds.class_names[1:]
    assert ds.colours == COLOURS and list(ds.colours) == list(COLOURS)
    ds.shape_names.append("blob")
    ds.colours.pop("red")  # copies: changing them leaves the world alone
    assert "blob" not in CLASS_NAMES and "red" in COLOURS
    s = ds[3]
    assert ds.caption(s.meta["objects"]) == s.prompt == caption(s.meta["objects"])
    edited = [dict(o) for o in s.meta["objects"]]
    edited[0]["colour"] = next(c for c in COLOURS if c != edited[0]["colour"])
    assert ds.caption(edited) != s.prompt and edited[0]["colour"] in ds.caption(edited)
