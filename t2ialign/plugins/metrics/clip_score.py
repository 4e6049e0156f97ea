"""``clip_score``: image-text agreement of generated images, with an open_clip model.

The metric itself (``100 * cos``, unclamped, mean over prompts with a 95% CI, and why) is
:class:`t2ialign.core.clip_scoring.ClipScore`; this plugin loads the CLIP model for it.

Prompts longer than the text tower's context (77 tokens for OpenAI CLIP) are truncated by the
open_clip tokenizer. Options: ``model`` (open_clip architecture name, ``hf-hub:`` / ``local-dir:``
schemes work too), ``pretrained`` (open_clip tag such as ``openai`` -- needs the weights in the
local cache or network -- or a checkpoint file), ``toy`` (use the project's toy CLIP from
``t2ialign/assets/toy_clip``: that request is answered by the toy world's plugin,
:mod:`t2ialign.plugins.toy.metrics`), ``device``, ``batch_size``.
"""

from __future__ import annotations

from typing import Any

from t2ialign.core.clip_scoring import METRIC_OPTIONS, ClipScore, clip_score_metric
from t2ialign.core.errors import ModelLoadError
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.specs import EntrySpec, PluginInfo

OPTIONS: dict[str, Any] = {"model": "ViT-B-32", "pretrained": "openai", "toy": False, **METRIC_OPTIONS}


def load_open_clip(model: str, pretrained: str | None, device: str = "cpu") -> tuple[Any, Any, Any]:
    """``(model, preprocess, tokenizer)`` from open_clip, with a clear error when weights are missing."""
    import open_clip

    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained or None,
                                                                    device=device)
    except Exception as exc:  # noqa: BLE001 - open_clip raises RuntimeError/OSError/HF errors alike
        raise ModelLoadError(
            f"open_clip could not load model '{model}' with pretrained '{pretrained}': {str(exc).splitlines()[0]}",
            where="metrics.clip_score",
            fix="without network, download the checkpoint elsewhere and set pretrained: /path/to/checkpoint.bin "
                "(or a local-dir:/folder model); for the toy world set toy: true",
        ) from exc
    return clip, preprocess, open_clip.get_tokenizer(model)


def make_clip_score(options: dict[str, Any], name: str = "clip_score") -> ClipScore:
    """The open_clip CLIP score of registry-style ``options`` (missing keys take :data:`OPTIONS`)."""
    opts = {**OPTIONS, **options}
    if opts.get("toy"):
        # the toy CLIP belongs to the toy world's plugin, which answers toy: true before this one;
        # reaching here means that plugin is not loaded
        raise ModelLoadError("the toy CLIP (toy: true) is offered by the toy world's plugin 'toy_oracle', "
                             "which is not loaded", where=f"metrics.{name}",
                             fix="do not exclude it (-p no:toy_oracle) and check 't2ialign plugins', "
                                 "or set toy: false and name an open_clip model")
    return clip_score_metric(lambda device: load_open_clip(str(opts["model"]), opts.get("pretrained"), device),
                             opts, name=name)


@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"metrics": {"clip_score": dict(OPTIONS)}},
                      description="CLIP score (100 x cosine, unclamped, mean over prompts with 95% CI) via open_clip")


@hookimpl
def t2ialign_make_metric(spec: EntrySpec) -> ClipScore | None:
    if spec.plugin != "clip_score":
        return None
    return make_clip_score(dict(spec.options), name=spec.name)


__all__ = ["OPTIONS", "load_open_clip", "make_clip_score"]
