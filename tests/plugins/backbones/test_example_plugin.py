"""The third-party backbone example of docs/backbones.md, registered in code and used end to end."""

from __future__ import annotations

import pytest
import torch

from t2ialign.core.errors import ConfigError
from t2ialign.core.host import Host
from t2ialign.core.protocols import Backbone
from tests.helpers.tiny_models import LATENT, cached_tiny_sd, write_registry
from tests.plugins.backbones import example_plugin


def _host(tmp_path, **options):
    reg = write_registry(tmp_path / "r.yaml", "mine", "sd_clip_skip", model=str(cached_tiny_sd()), **options)
    return Host(registry_files=[reg], extra_plugins=[("example", example_plugin)])


def test_example_plugin_builds_a_working_backbone(tmp_path):
    host = _host(tmp_path, clip_skip=1)
    b = host.backbone("mine")
    assert isinstance(b, example_plugin.ClipSkipBackbone) and isinstance(b, Backbone)
    cond = b.encode_text(["a photo of cat"])
    ids = b.tokenizer(["a photo of cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = b.text_encoder(ids, output_hidden_states=True)
        expected = b.text_encoder.final_layer_norm(out.hidden_states[-2])
    assert torch.allclose(cond.embeds, expected, atol=1e-6)
    assert not torch.allclose(cond.embeds, out.last_hidden_state, atol=1e-3)
    # the built-in extractor hooks it, since it is a UNet backbone
    with host.extractor(b).capture(token_indices=b.token_spans("a photo of cat", "cat")) as store:
        b.predict(torch.randn(1, 4, LATENT, LATENT), torch.tensor([20.0]), cond)
    assert store.hooked["cross"] == 7 and all(m.shape[-1] == 1 for m in store.cross.values())


def test_example_plugin_validates_its_options(tmp_path):
    with pytest.raises(ConfigError, match="clip_skip"):
        _host(tmp_path, clip_skip=-1).backbone("mine")
