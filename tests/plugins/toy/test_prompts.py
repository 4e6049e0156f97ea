"""The toy world's prompt set ``toy_prompts``: prompts with the objects and phrases they ask for."""

from __future__ import annotations

import pytest
import yaml

from t2ialign.core.errors import ConfigError
from t2ialign.core.host import Host
from t2ialign.plugins.toy.prompts import make_toy_prompts
from t2ialign.plugins.toy.world import CLASS_NAMES, COLOURS, compositional_prompts


def _host(tmp_path, datasets):
    reg = tmp_path / "reg.yaml"
    reg.write_text(yaml.safe_dump({"datasets": datasets}))
    return Host(registry_files=[reg])


def test_toy_prompts_carry_their_objects_and_phrases(tmp_path):
    host = _host(tmp_path, {"toy_prompts": {"plugin": "toy_prompts", "n": 40, "seed": 3}})
    ds = host.dataset("toy_prompts", "test")
    assert len(ds) == 40
    expected = compositional_prompts(40, seed=3)
    for i in range(40):
        s = ds[i]
        assert s.prompt == expected[i]
        objs = s.meta["objects"]
        assert 2 <= len(objs) <= 3
        assert all(o["shape"] in CLASS_NAMES and o["colour"] in COLOURS for o in objs)
        # each object phrase is in the prompt, and rebuilding the prompt from the objects is exact
        assert s.phrases == [f"{'an' if o['colour'][0] in 'aeiou' else 'a'} {o['colour']} {o['shape']}" for o in objs]
        assert all(p in s.prompt for p in s.phrases)
        assert len({o["shape"] for o in objs}) == len(objs)
    assert len(make_toy_prompts({"n": 40, "seed": 3, "limit": 5}, "val")) == 5
    with pytest.raises(ConfigError, match="max_objects"):
        make_toy_prompts({"max_objects": 1}, "test")
