"""Shared setup of the editing tests: fast config overrides, the tiny-SD registry, a tiny CLIP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests.helpers.tiny_models import cached_tiny_sd

ARCH = "t2ialign-test-edit-clip"
CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
FAST = ["steps=4", "elbo.timesteps=[[1, 999, 250]]", "collect.timesteps=[[20, 101, 40]]", "collect.batch_size=2",
        "layers.cross_weight=[1, 1, 1, 1, 1]", "layers.self_weight=[[1, 0, 0, 0, 1], [0, 0, 0, 0, 1]]",
        "bootstrap=50", "visuals=2"]

BASE_REGISTRY = (
    "backbones:\n  tiny: {{plugin: stable_diffusion, model: '{model}'}}\n"
    "datasets:\n  toy_small: {{plugin: toy_shapes, n_test: 20}}\n"
    "tasks:\n  editing: {{plugin: editing}}\n"
)


def edit_config(**extra: Any) -> dict[str, Any]:
    """The editing task's defaults on backbone ``tiny`` with :data:`FAST` and ``extra`` overrides."""
    from t2ialign.core.config import resolve_config
    from t2ialign.plugins.tasks.editing.task import DEFAULTS

    return resolve_config(DEFAULTS, None, ["backbone=tiny", *FAST] + [f"{k}={v}" for k, v in extra.items()])


def write_base_registry(path: Path) -> Path:
    """The tiny SD backbone ``tiny``, the dataset ``toy_small`` and the task ``editing``."""
    path.write_text(BASE_REGISTRY.format(model=cached_tiny_sd()))
    return path


def write_clip_registry(root: Path) -> Path:
    """The base registry plus a tiny random open_clip model as ``clip_tiny`` and the toy oracle."""
    import open_clip

    (root / f"{ARCH}.json").write_text(json.dumps(CLIP_CONFIG))
    open_clip.add_model_config(root / f"{ARCH}.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model(ARCH, pretrained=None).state_dict(), root / "clip.pt")
    reg = root / "reg.yaml"
    reg.write_text(
        BASE_REGISTRY.format(model=cached_tiny_sd())
        + f"metrics:\n  clip_tiny: {{plugin: clip_score, model: {ARCH}, pretrained: '{root / 'clip.pt'}'}}\n"
        "  oracle: {plugin: toy_oracle}\n"
    )
    return reg
