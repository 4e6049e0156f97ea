"""Model-agnostic helpers shared by the backbone plugins: where a model lives, how a component
is loaded (with one clear error when a hub id cannot be reached), dtype names, image
preprocessing and the ``t2ialign_plugin_info`` hook of a one-backbone plugin module.

Every backbone plugin (SD 1.x/2.x, SDXL, SD3, third-party ones) loads its parts through
:func:`load_component` so that "no network" always produces the same actionable message.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from t2ialign.core.errors import ConfigError, InputError, ModelLoadError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.specs import PluginInfo

#: prefix of ``model:`` values that name a model shipped inside the package (``builtin:toy``)
BUILTIN_PREFIX = "builtin:"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def backbone_info_hook(plugin_name: str, options: dict[str, Any], description: str) -> Callable[[], PluginInfo]:
    """The ``t2ialign_plugin_info`` hook implementation of a module that provides one backbone.

    Assign it to the module's ``t2ialign_plugin_info``. Only this hook is shared: each module
    keeps its own ``t2ialign_make_backbone`` function, because the host names the plugin whose
    make hook raised by the hook function's code object (one shared function would blame one
    plugin for all of them).
    """

    @hookimpl
    def t2ialign_plugin_info() -> PluginInfo:
        return PluginInfo(provides={"backbones": {plugin_name: dict(options)}}, description=description)

    return t2ialign_plugin_info


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float16"`` / ``"fp16"`` / ``"bfloat16"`` / ``"float32"`` ... -> the ``torch.dtype``."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(
            f"unknown dtype '{name}'",
            fix=f"use one of {sorted(set(_DTYPES))}",
        )
    return _DTYPES[key]


def offline_mode(option: bool | None = None) -> bool:
    """Whether hub ids must be loaded from the local cache only.

    ``option`` (the registry's ``offline:``) wins; ``None`` follows ``HF_HUB_OFFLINE`` (read at
    call time, not import time, so tests and notebooks can flip it).
    """
    if option is not None:
        return bool(option)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _looks_like_path(model: str) -> bool:
    # hub ids are "org/name"; anything absolute, relative-dotted, home-based or Windows-like is a path
    return model.startswith(("/", "./", "../", "~", ".\\")) or (len(model) > 1 and model[1] == ":")


def is_local(model: str) -> bool:
    """Is ``model`` (after :func:`resolve_model_path`) a folder on this machine?"""
    return Path(model).expanduser().is_dir()


def resolve_model_path(model: str, *, offline: bool) -> str:
    """Turn a registry ``model:`` value into what ``from_pretrained`` gets.

    - a local folder is returned as is (``~`` expanded);
    - ``builtin:NAME`` -> the folder ``t2ialign/assets/NAME`` shipped in the package;
    - anything else is a hub id and is returned unchanged (``offline`` only changes how
      :func:`load_component` loads it: from the local cache, ``local_files_only=True``).
    """
    if not isinstance(model, str) or not model.strip():
        raise ModelLoadError(
            "no model given (option 'model' is empty)",
            fix="set 'model:' of the backbone entry to a hub id or a local diffusers folder "
            "in a registry file passed with --registry",
        )
    model = model.strip()
    if model.startswith(BUILTIN_PREFIX):
        name = model[len(BUILTIN_PREFIX):]
        folder = Path(str(resources.files("t2ialign").joinpath("assets", name)))
        if not (folder / "model_index.json").is_file() and not any(folder.glob("*/config.json")):
            raise ModelLoadError(
                f"built-in model '{name}' is not shipped/trained yet: {folder} has no model files",
                fix="run `t2ialign train-toy` to train it, or point 'model:' at another folder",
            )
        return str(folder)
    expanded = Path(model).expanduser()
    if expanded.is_dir():
        return str(expanded)
    if _looks_like_path(model) or expanded.exists():
        raise ModelLoadError(
            f"model folder not found: {model}",
            fix="check the path, or give a hub id like 'org/name'",
        )
    return model


def _offline_fix(model: str) -> str:
    return (
        f"download it on a connected machine with `hf download {model} --local-dir DIR`, copy DIR "
        "here, then set `model: DIR` for this backbone in a registry file passed with --registry FILE"
    )


def load_component(
    cls: Any,
    path: str,
    subfolder: str | None,
    *,
    dtype: torch.dtype | None,
    offline: bool,
    what: str,
    revision: str | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.from_pretrained(path, subfolder=...)`` with errors that say how to fix them.

    ``path`` comes from :func:`resolve_model_path`. For a hub id while ``offline`` only the local
    cache is used; a hub id that cannot be fetched (offline or any connection error) raises one
    :class:`ModelLoadError` explaining how to use a local folder instead. ``what`` names the
    component in messages (``"UNet"``, ``"VAE"``...).
    """
    local = is_local(path)
    args: dict[str, Any] = dict(kwargs)
    if subfolder:
        args["subfolder"] = subfolder
    if dtype is not None:
        # diffusers and transformers 5.x both take ``torch_dtype`` (transformers also ``dtype``)
        args["torch_dtype"] = dtype
    if not local:
        args["local_files_only"] = offline
        if revision is not None:
            args["revision"] = revision
    where = f"{path}/{subfolder}" if subfolder else path
    if local and subfolder and not (Path(path) / subfolder).is_dir():
        raise ModelLoadError(
            f"{what} is missing: no folder '{subfolder}' in {path}",
            where=where,
            fix="point 'model:' at a complete diffusers-layout folder (model_index.json, unet/, vae/, "
            "text_encoder/, tokenizer/, scheduler/), e.g. one written by Pipeline.save_pretrained",
        )
    try:
        return cls.from_pretrained(path, **args)
    except Exception as exc:  # noqa: BLE001 - we translate every loader failure into one message
        if not local:
            reason = "offline mode is on (HF_HUB_OFFLINE=1 or option offline: true)" if offline else (
                "it could not be downloaded")
            raise ModelLoadError(
                f"cannot load {what} of hub model '{path}': {reason} and it is not in the local "
                f"cache ({type(exc).__name__}: {_first_line(exc)})",
                where=where,
                fix=_offline_fix(path),
            ) from exc
        raise ModelLoadError(
            f"cannot load {what} from {where}: {type(exc).__name__}: {_first_line(exc)}",
            where=where,
            fix="check that the folder was written by diffusers/transformers save_pretrained and "
            "matches this backbone plugin",
        ) from exc


def component_loader(path: str, *, offline: bool,
                     revision: str | None = None) -> Callable[[Any, str, str, torch.dtype | None], Any]:
    """``load(cls, subfolder, what, dtype)``: :func:`load_component` for the parts of one model."""

    def load(cls: Any, subfolder: str, what: str, dtype: torch.dtype | None) -> Any:
        return load_component(cls, path, subfolder, dtype=dtype, what=what, offline=offline, revision=revision)

    return load


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


def read_json_config(path: str, subfolder: str, filename: str, *, offline: bool, what: str,
                     revision: str | None = None) -> dict[str, Any]:
    """A JSON config file of a local folder or hub repo (e.g. ``scheduler/scheduler_config.json``)."""
    import json

    if is_local(path):
        file = Path(path) / subfolder / filename
        if not file.is_file():
            raise ModelLoadError(
                f"{what} is missing: {file} does not exist",
                where=path,
                fix="point 'model:' at a complete diffusers-layout folder",
            )
        return json.loads(file.read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download

    try:
        file = hf_hub_download(path, filename, subfolder=subfolder, revision=revision,
                               local_files_only=offline)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"cannot load {what} of hub model '{path}' ({type(exc).__name__}: {_first_line(exc)})",
            where=f"{path}/{subfolder}",
            fix=_offline_fix(path),
        ) from exc
    return json.loads(Path(file).read_text(encoding="utf-8"))


def images_to_tensor(
    images: torch.Tensor | np.ndarray | Sequence[Any],
    size: int | tuple[int, int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Images -> ``(B, 3, S, S)`` in ``[-1, 1]``, the VAE's input.

    Accepts a float tensor ``(B, 3, H, W)`` / ``(3, H, W)`` in ``[0, 1]``, a uint8 ``H x W x 3``
    array (or a list of them, or of PIL images). Resizing is a square resize *without* aspect
    preservation, bilinear with antialiasing (the reference feeds PIL images to diffusers'
    ``VaeImageProcessor`` at the VAE sample size, i.e. a plain square resize).
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise InputError("no images given", fix="pass at least one image")
        # each image is resized on its own, so a batch may mix sizes
        return torch.cat([images_to_tensor(img, size, device=device, dtype=dtype) for img in images])
    batch = _as_float_batch(images)
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise InputError(
            f"images must be RGB with shape (B, 3, H, W), got {tuple(batch.shape)}",
            fix="convert grayscale/RGBA images to RGB before encoding",
        )
    if not torch.isfinite(batch).all():
        raise InputError("images contain NaN or Inf values", fix="check the image loading code")
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(batch.shape[-2:]) != out_hw:
        batch = F.interpolate(batch, size=out_hw, mode="bilinear", align_corners=False, antialias=True)
    batch = batch.clamp(0.0, 1.0) * 2.0 - 1.0
    return batch.to(device=device, dtype=dtype)


def _as_float_batch(images: Any) -> torch.Tensor:
    """Any supported image container -> float32 ``(B, 3, H, W)`` in ``[0, 1]``."""
    if isinstance(images, torch.Tensor):
        t = images.detach().float()
        if images.dtype == torch.uint8:
            t = t / 255.0
        return t.unsqueeze(0) if t.ndim == 3 else t
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise InputError(f"image arrays must be H x W x 3, got shape {images.shape}")
        scale = 255.0 if images.dtype == np.uint8 else 1.0
        return torch.from_numpy(np.ascontiguousarray(images)).float().div(scale).permute(0, 3, 1, 2)
    if hasattr(images, "convert"):  # a PIL image
        return _as_float_batch(np.asarray(images.convert("RGB")))
    raise InputError(f"unsupported image type {type(images).__name__}",
                     fix="pass a uint8 H x W x 3 array, a PIL image or a float (B, 3, H, W) tensor")
