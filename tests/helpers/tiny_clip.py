"""A tiny randomly initialised open_clip model from a custom config, saved as a checkpoint file.

open_clip only builds architectures it has a config for, so the config is written to a JSON file
and registered with ``open_clip.add_model_config``; the random weights are saved with
``torch.save`` so that metrics load them through the real ``pretrained=<file>`` path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCH = "t2ialign-test-tiny-clip"
CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_clip_checkpoint(folder: str | Path, seed: int = 0) -> tuple[str, Path]:
    """``(arch name, checkpoint path)`` of a tiny open_clip model written into ``folder``."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{ARCH}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(folder / f"{ARCH}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(ARCH, pretrained=None)
    path = folder / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return ARCH, path
