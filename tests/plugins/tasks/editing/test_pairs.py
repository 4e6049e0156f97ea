"""Edit pairs from toy scenes, with the world's vocabulary taken from the dataset object."""

from __future__ import annotations

import pytest

from t2ialign.core.errors import ConfigError
from t2ialign.plugins.tasks.editing.pairs import toy_edit_pairs, toy_vocabulary


@pytest.fixture(scope="module")
def toy30(host):
    return host.dataset({"name": "toy30", "plugin": "toy_shapes", "n_test": 30}, "test")


def test_toy_edit_pairs_change_exactly_one_object(toy30):
    pairs = toy_edit_pairs(toy30, 6, seed=3)
    again = toy_edit_pairs(toy30, 6, seed=3)
    assert [p.target for p in pairs] == [p.target for p in again] and len(pairs) == 6
    assert [p.kind for p in pairs] == ["colour", "shape"] * 3
    for p in pairs:
        assert len(p.words) == len(set(p.words)) >= 2 and p.source != p.target
        diff = [i for i, (a, b) in enumerate(zip(p.objects, p.target_objects)) if a != b]
        assert diff == [p.edited] and p.edit_words == [p.objects[p.edited]["shape"]]
        key = "colour" if p.kind == "colour" else "shape"
        assert p.objects[p.edited][key] != p.target_objects[p.edited][key]
        assert p.object_mask.any() and (p.allowed | ~p.object_mask).all()


def test_the_vocabulary_comes_from_the_dataset(toy30):
    shapes, colours, caption = toy_vocabulary(toy30)
    assert shapes == toy30.class_names[1:] and "background" not in shapes
    assert "red" in colours and len(colours) == len(set(colours)) >= 2
    # the source caption of a pair is the dataset's own caption of the scene
    pair = toy_edit_pairs(toy30, 1, seed=0)[0]
    assert pair.source == toy30[int(pair.id.split("_")[1])].prompt == caption(pair.objects)


def test_a_dataset_without_a_toy_vocabulary_is_refused():
    class Plain:
        name = "plain"
        class_names = ["background", "cat"]

        def __len__(self):
            return 0

    with pytest.raises(ConfigError, match="does not describe a toy world") as info:
        toy_edit_pairs(Plain(), 1, seed=0)
    assert "colours" in info.value.what and "caption(objects)" in info.value.what
