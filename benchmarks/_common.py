"""Shared pieces of the benchmark scripts: machine description, backbones to measure, JSON output.

Backbones the benchmarks know:

* ``toy``: the registry backbone trained in this repository (``t2ialign/assets/toy``);
* ``tiny-random``: a few-channel random SD model written with ``tests/helpers/tiny_models.make_tiny_sd``
  into a temporary folder and loaded through the real ``stable_diffusion`` plugin (smoke tests);
* ``sd15-config``: a random-weight ``UNet2DConditionModel`` built from Stable Diffusion 1.5's
  published UNet config (64x64 latents, 512x512 images) with a CLIP text encoder of SD1.5's size,
  wrapped in the real :class:`StableDiffusionBackbone`. Real cost, meaningless maps. Its VAE is a
  few-channel one with SD's 8x downsampling: the benchmarks measure the denoiser and what we add
  around it, and the real VAE encode (~one UNet forward per image) is the same for every schedule.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: Stable Diffusion 1.5's UNet (``unet/config.json`` of stable-diffusion-v1-5), the values that
#: set its size and cost; everything else is diffusers' default for ``UNet2DConditionModel``.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
}
#: SD1.5's text encoder (CLIP ViT-L/14 text tower)
SD15_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}
#: SD1.5's scheduler (scaled-linear betas 0.00085 -> 0.012, 1000 steps, epsilon prediction)
SD15_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
    "skip_prk_steps": True,
}
#: SDXL-base's UNet at 128x128 latents (1024x1024 images); used by the GPU script
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}

#: layer weights of the tiny random SD (5 cross-attention resolution groups)
TINY_LAYERS: dict[str, Any] = {"cross_weight": [1, 1, 1, 1, 1], "self_weight": [[1, 0, 0, 0, 1], [0, 0, 0, 0, 1]]}


def machine() -> dict[str, Any]:
    """CPU model, core count, torch/diffusers versions, GPU (if any): printed with every table."""
    import diffusers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def command_line(script: str, argv: list[str] | None) -> str:
    args = argv if argv is not None else sys.argv[1:]
    return " ".join(["python", f"benchmarks/{script}", *args]).strip()


def write_result(path: Path, report: dict[str, Any]) -> None:
    """Print the JSON and write it (atomically, so a killed run leaves the old file intact)."""
    from t2ialign.core.fileio import atomic_write_text

    text = json.dumps(report, indent=2, default=float)
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + "\n")


def tests_helpers():
    """``tests/helpers`` (tiny model builders); one definition shared with the tests, no copy."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.helpers import tiny_models

    return tiny_models


def tiny_registry(folder: Path | None = None, *, n_val: int = 3, n_test: int = 6) -> Path:
    """A registry file with backbone ``tiny-random`` (a fresh tiny SD) and dataset ``toy_small``.

    The folder is created under a temporary directory unless given (it is reused when it
    already holds the model, so memory probes in subprocesses load the same weights).
    """
    tiny = tests_helpers()
    root = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="t2ialign-bench-"))
    model = root / "tiny"
    if not (model / "model_index.json").exists():
        tiny.make_tiny_sd(model)
    reg = root / "registry.yaml"
    layers = json.dumps(TINY_LAYERS)[1:-1]  # YAML flow mapping items
    reg.write_text(
        f"backbones:\n  tiny-random: {{plugin: stable_diffusion, model: '{model}', {layers}}}\n"
        f"datasets:\n  toy_small: {{plugin: toy_shapes, n_val: {n_val}, n_test: {n_test}, image_size: 64}}\n"
    )
    return reg


def sd15_config_backbone(device: str = "cpu", dtype: torch.dtype = torch.float32, *,
                         unet_config: dict[str, Any] | None = None, seed: int = 0):
    """A :class:`StableDiffusionBackbone` around a random SD1.5-config UNet (see module docstring)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from t2ialign.core.clip_tokenizer import clip_tokenizer
    from t2ialign.plugins.backbones.stable_diffusion import OPTIONS as SD_OPTIONS, StableDiffusionBackbone

    torch.manual_seed(seed)
    dev = torch.device(device)
    with dev:  # initialise where the model runs: on a GPU that takes seconds, not ~25 s on its host CPU
        unet = UNet2DConditionModel(**(unet_config or SD15_UNET_CONFIG))
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
        # 4 levels = SD's 8x downsampling (512 px -> 64x64 latents) at a few channels
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=4, sample_size=512, scaling_factor=0.18215)
    for module in (unet, text, vae):
        module.requires_grad_(False).eval()
    unet.to(dev, dtype)
    text.to(dev, dtype)
    vae.to(dev)
    return StableDiffusionBackbone(
        name="sd15-config", unet=unet, vae=vae, text_encoder=text, tokenizer=clip_tokenizer(),
        scheduler_config=SD15_SCHEDULER, prediction_type="epsilon", image_size=512, device=dev, dtype=dtype,
        layer_defaults={"cross_weight": SD_OPTIONS["cross_weight"], "cross_gaussian_sigma": 0.0,
                        "self_weight": SD_OPTIONS["self_weight"]},
    )


def toy_model_ready() -> bool:
    """Has the toy model been trained and exported into the package yet?"""
    folder = ROOT / "t2ialign" / "assets" / "toy"
    return (folder / "model_index.json").is_file()


def build_backbone(name: str, *, workdir: Path | None = None, device: str = "cpu"):
    """``(backbone, extractor, host_or_None)`` for a benchmark backbone name."""
    from t2ialign.core.host import Host
    from t2ialign.plugins.extractors.unet import UNetAttentionExtractor

    if name == "sd15-config":
        backbone = sd15_config_backbone(device)
        return backbone, UNetAttentionExtractor(backbone), None
    if name == "tiny-random":
        host = Host(registry_files=[tiny_registry(workdir)])
        backbone = host.backbone("tiny-random", device=device)
        return backbone, host.extractor(backbone), host
    host = Host()
    backbone = host.backbone(name, device=device)
    return backbone, host.extractor(backbone), host


def strip_main(strip: Any, doc: str, what: str, default_out: str, default_n: int, argv: list[str] | None) -> int:
    """The command line of a picture-strip script: ``RUN [--out PNG] [--n N]`` -> ``strip(run, n)`` saved."""
    import argparse

    from t2ialign.core.report import save_png

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("run", type=Path, help=f"output folder of {what} run")
    parser.add_argument("--out", type=Path, default=Path(default_out))
    parser.add_argument("--n", type=int, default=default_n, help="items to show")
    args = parser.parse_args(argv)
    save_png(args.out, strip(args.run, args.n))
    print(f"wrote {args.out}")
    return 0
