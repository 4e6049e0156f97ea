"""The toy world's metric hooks: the ``toy_oracle`` detector and the toy-CLIP variant of ``clip_score``.

* ``toy_oracle`` (:class:`~t2ialign.plugins.toy.oracle.ToyOracle`): are the requested shapes
  in the requested colours in a generated image?
* ``clip_score`` with ``toy: true`` (the registry entry ``clip_score_toy``): the CLIP score of
  :mod:`t2ialign.core.clip_scoring` computed with the toy CLIP shipped in
  ``t2ialign/assets/toy_clip`` (:func:`~t2ialign.plugins.toy.clip.load_toy_clip`). The generic
  ``clip_score`` plugin knows nothing of the toy world; this hook runs first (``tryfirst``) and
  takes the ``toy: true`` requests, every other ``clip_score`` request goes on to open_clip.
"""

from __future__ import annotations

from typing import Any

from t2ialign.core.clip_scoring import ClipScore, clip_score_metric
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign.plugins.toy.oracle import OPTIONS, ToyOracle


def make_toy_clip_score(options: dict[str, Any], name: str = "clip_score_toy") -> ClipScore:
    """The CLIP score with the shipped toy CLIP (options ``device``, ``batch_size``)."""
    # imported here: loading the toy CLIP pulls in open_clip, which plugin discovery must not pay for
    from t2ialign.plugins.toy.clip import load_toy_clip

    return clip_score_metric(lambda device: load_toy_clip(device=device), options, name=name)


@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"metrics": {"toy_oracle": dict(OPTIONS)}},
                      description="toy-world oracle: requested shapes / colours present in a generated image")


@hookimpl(tryfirst=True)
def t2ialign_make_metric(spec: EntrySpec) -> ToyOracle | ClipScore | None:
    if spec.plugin == "toy_oracle":
        opts = {**OPTIONS, **spec.options}
        return ToyOracle(float(opts["colour_radius"]), float(opts["min_area_fraction"]), float(opts["min_iou"]))
    if spec.plugin == "clip_score" and spec.options.get("toy"):
        return make_toy_clip_score(dict(spec.options), name=spec.name)
    return None


__all__ = ["make_toy_clip_score"]
