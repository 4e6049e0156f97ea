"""The host: one object that owns the plugin manager and the registry and builds things by name.

Everything a pipeline needs (backbone, extractor, attention editor, weighting, dataset, metric,
task, phrase extractor) is asked from the plugins through the firstresult "make" hooks; a request
nobody answers becomes a :class:`~t2ialign.core.errors.PluginError` that lists what is available
(except the attention editor: its caller says in its own words why it refuses the backbone).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable

from t2ialign.core.errors import ConfigError, PluginError, T2IAlignError
from t2ialign.core.plugin_manager import LoadedPlugins, load_plugins
from t2ialign.core.registry import Registry
from t2ialign.core.specs import EntrySpec

if TYPE_CHECKING:  # the protocols module imports torch; the host must not (t2ialign --help builds none)
    from t2ialign.core.protocols import AttentionExtractor, Backbone, Dataset, Metric, PhraseExtractor, Task, Weighting


class Host:
    """Plugins + registry. ``Host()`` is all a notebook needs."""

    def __init__(
        self,
        registry_files: Iterable[str | os.PathLike] = (),
        disable: Iterable[str] = (),
        extra_plugins: Iterable[tuple[str, Any]] = (),
    ):
        self.plugins: LoadedPlugins = load_plugins(disable=disable, extra=extra_plugins)
        self.registry: Registry = Registry.load(self.plugins, registry_files)

    @property
    def hook(self) -> Any:
        return self.plugins.pm.hook

    # ------------------------------------------------------------------ helpers
    def _spec(self, section: str, name_or_spec: str | EntrySpec | dict[str, Any]) -> EntrySpec:
        if isinstance(name_or_spec, EntrySpec):
            return name_or_spec
        if isinstance(name_or_spec, dict):
            body = dict(name_or_spec)
            name = str(body.pop("name", "<inline>"))
            self.registry.add_mapping({section: {name: body}}, origin="<inline>")
            return self.registry.spec(section, name)
        return self.registry.spec(section, name_or_spec)

    def _call(self, hook_name: str, what: str, about: EntrySpec | None, *, required: bool = True,
              **kwargs: Any) -> Any:
        caller = getattr(self.hook, hook_name)
        try:
            result = caller(**kwargs)
        except T2IAlignError:
            raise
        except Exception as exc:
            culprit = _raising_plugin(caller, exc)
            if culprit is not None:
                raise PluginError(
                    f"plugin '{culprit}' raised {type(exc).__name__} while building {what}: {exc}",
                    where=about.where if about else hook_name,
                    fix=f"this is a bug in plugin '{culprit}': report it to its authors, or run with "
                        f"-p no:{culprit} to exclude it",
                ) from exc
            impls = [i.plugin_name for i in caller.get_hookimpls()]
            raise PluginError(
                f"a plugin raised {type(exc).__name__} while building {what}: {exc}",
                where=about.where if about else hook_name,
                fix=f"this is a bug in one of the plugins {impls}; run with -p no:NAME to exclude one",
            ) from exc
        if result is None and required:
            raise PluginError(
                f"no plugin could build {what}",
                where=about.where if about else hook_name,
                fix="see 't2ialign plugins' for what is installed and which plugins failed to load",
            )
        return result

    # ------------------------------------------------------------------ builders
    def backbone(self, name: str | EntrySpec | dict[str, Any], device: str = "cpu", dtype: str = "float32") -> Backbone:
        spec = self._spec("backbones", name)
        check_device(device)
        return self._call("t2ialign_make_backbone", f"backbone '{spec.name}' (plugin {spec.plugin})", spec,
                          spec=spec, device=device, dtype=dtype)

    def extractor(self, backbone: Backbone, name: str = "auto") -> AttentionExtractor:
        spec = EntrySpec("extractors", name, name) if name == "auto" else self._spec("extractors", name)
        return self._call("t2ialign_make_attention_extractor",
                          f"an attention extractor for {getattr(backbone, 'name', backbone)!s} "
                          f"(attention kind {getattr(backbone, 'attention_kind', '?')})",
                          spec, backbone=backbone, spec=spec)

    def attention_editor(self, backbone: Backbone) -> Any | None:
        """The factory of attention-edit controllers for ``backbone`` (hook
        ``t2ialign_make_attention_editor``), or ``None`` when no plugin can edit its attention:
        the caller refuses the backbone in its own words (editing says why per attention kind)."""
        return self._call("t2ialign_make_attention_editor",
                          f"an attention editor for {getattr(backbone, 'name', backbone)!s} "
                          f"(attention kind {getattr(backbone, 'attention_kind', '?')})",
                          None, required=False, backbone=backbone)

    def weighting(self, prediction_type: str, scheme: str) -> Weighting:
        return self._call("t2ialign_make_weighting",
                          f"ELBO weighting scheme '{scheme}' for prediction type '{prediction_type}'",
                          None, prediction_type=prediction_type, scheme=scheme)

    def dataset(self, name: str | EntrySpec | dict[str, Any], split: str) -> Dataset:
        spec = self._spec("datasets", name)
        return self._call("t2ialign_make_dataset", f"dataset '{spec.name}' split '{split}'", spec,
                          spec=spec, split=split)

    def metric(self, name: str | EntrySpec | dict[str, Any]) -> Metric:
        spec = self._spec("metrics", name)
        return self._call("t2ialign_make_metric", f"metric '{spec.name}'", spec, spec=spec)

    def task(self, name: str | EntrySpec | dict[str, Any]) -> Task:
        spec = self._spec("tasks", name)
        return self._call("t2ialign_make_task", f"task '{spec.name}'", spec, spec=spec)

    def phrase_extractor(self, name: str = "auto") -> PhraseExtractor:
        spec = EntrySpec("phrases", name, name) if name == "auto" else self._spec("phrases", name)
        return self._call("t2ialign_make_phrase_extractor", f"phrase extractor '{name}'", spec, spec=spec)


def _raising_plugin(caller: Any, exc: BaseException) -> str | None:
    """The plugin whose hook implementation is on the traceback of ``exc`` (None if unknown).

    pluggy calls every implementation of a firstresult hook in turn; the frame of the one that
    raised is on the traceback, so the culprit can be named instead of listing all of them.
    """
    codes = {impl.function.__code__: impl.plugin_name for impl in caller.get_hookimpls()
             if hasattr(impl.function, "__code__")}
    tb = exc.__traceback__
    while tb is not None:
        name = codes.get(tb.tb_frame.f_code)
        if name is not None:
            return name
        tb = tb.tb_next
    return None


def check_device(device: Any) -> None:
    """Refuse a device string torch cannot parse, or an accelerator this machine does not have.

    Checked before any model loads: otherwise the first ``.to(device)`` deep inside a plugin fails
    with torch's own message, which reads like a plugin bug.
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"'{device}' is not a torch device", where="config key device",
                          fix="use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device '{device}' is not available: this machine (or this torch build) has no CUDA GPU",
                              where="config key device", fix="use device=cpu (or --device cpu)")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device '{device}' is not available: this machine has {count} CUDA GPU(s)",
                              where="config key device", fix=f"use cuda:0 .. cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device '{device}' is not available: this torch build or machine has no MPS support",
                          where="config key device", fix="use device=cpu")
