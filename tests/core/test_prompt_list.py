"""The prompt-set container and its ``limit`` option check."""

from __future__ import annotations

import pytest

from t2ialign.core.errors import ConfigError
from t2ialign.core.prompt_list import PromptList, check_limit
from t2ialign.core.protocols import Dataset, Sample


def test_prompt_list_is_a_dataset_without_label_ids():
    ds = PromptList("mine", "test", [Sample(id="a", prompt="a red star"), Sample(id="b", prompt="a blue circle")])
    assert isinstance(ds, Dataset) and ds.class_names == [] and len(ds) == 2
    assert ds[1].prompt == "a blue circle" and (ds.name, ds.split) == ("mine", "test")


@pytest.mark.parametrize("bad", [-1, 2.5, True, "10"])
def test_check_limit_refuses_what_is_not_a_count(bad):
    with pytest.raises(ConfigError, match="limit must be a non-negative integer or null") as err:
        check_limit(bad, "datasets.mine.limit")
    assert err.value.where == "datasets.mine.limit"


def test_check_limit_keeps_counts_and_none():
    assert check_limit(None, "x") is None and check_limit(0, "x") == 0 and check_limit(7, "x") == 7
