"""The plugin contract of t2ialign: every hook a plugin may implement.

This module *is* the contract. The host (``t2ialign.core``) calls these hooks; built-in plugins
(``t2ialign.plugins``) and third-party packages (entry-point group ``t2ialign``) implement them
with ``@hookimpl``. "Make" hooks are ``firstresult``: each plugin looks at the request, returns an
object when it recognises it and ``None`` otherwise, and the first non-``None`` answer wins.

Requests name a plugin through an :class:`~t2ialign.core.specs.EntrySpec` (a resolved
``registry.yaml`` entry: ``spec.plugin`` says which implementation is wanted, ``spec.options``
holds its keyword options). A plugin must answer ``None`` for a ``spec.plugin`` it does not own,
so that several plugins can share one hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # imported for annotations only; keeps ``import t2ialign`` light
    from t2ialign.core.protocols import (
        AttentionEditControl,
        AttentionExtractor,
        Backbone,
        Dataset,
        Metric,
        PhraseExtractor,
        Task,
        Weighting,
    )
    from t2ialign.core.specs import EntrySpec, PluginInfo

PROJECT = "t2ialign"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def t2ialign_plugin_info() -> PluginInfo:
    """Describe what this plugin provides.

    Called: when the plugin manager lists plugins (``t2ialign plugins``), when the registry is
    validated (to check each entry's keys and types against the owning plugin's options) and
    when a request names a plugin nobody provides (to list the known names in the error).
    Gets: nothing.
    Returns: a :class:`~t2ialign.core.specs.PluginInfo` naming, per registry section
    (``backbones``, ``datasets``, ``metrics``, ``tasks``, ``extractors``, ``weightings``,
    ``phrases``), the ``plugin:`` names this plugin answers and the options each accepts
    (option name -> default value; the default's type is the accepted type, ``None`` accepts
    anything).
    """


@hookspec(firstresult=True)
def t2ialign_make_backbone(spec: EntrySpec, device: str, dtype: str) -> Backbone | None:
    """Build the backbone adapter for a registry entry of section ``backbones``.

    Called: once per run, before any image is processed.
    Gets: the resolved entry (``spec.plugin`` names the wanted implementation, ``spec.options``
    holds e.g. ``model``: a hub id or a local folder), the torch device string and the dtype
    name of the denoiser (``"float32"``, ``"float16"``, ``"bfloat16"``).
    Returns: an object satisfying :class:`~t2ialign.core.protocols.Backbone`, or ``None`` when
    ``spec.plugin`` is not this plugin's. Must raise a :class:`~t2ialign.core.errors.T2IAlignError`
    that says how to fix it when the entry is this plugin's but cannot be loaded (for example a
    hub id while offline).
    """


@hookspec(firstresult=True)
def t2ialign_make_attention_extractor(
    backbone: Backbone, spec: EntrySpec
) -> AttentionExtractor | None:
    """Build the attention extractor that knows how to hook this backbone's denoiser.

    Called: whenever a task needs attention maps (after the backbone was built).
    Gets: the backbone adapter and the extractor entry (``spec.plugin`` is ``"auto"`` unless the
    user picked one; ``spec.options`` may restrict layers).
    Returns: an :class:`~t2ialign.core.protocols.AttentionExtractor`, or ``None`` when this plugin
    does not know the backbone's denoiser (answer by inspecting ``backbone.attention_kind``).
    """


@hookspec(firstresult=True)
def t2ialign_make_attention_editor(backbone: Backbone) -> Callable[..., AttentionEditControl] | None:
    """Offer Prompt-to-Prompt attention control for this backbone's denoiser.

    Called: when the editing task or ``t2ialign edit`` builds its editor (after the backbone was
    built), before any image is processed.
    Gets: the backbone adapter.
    Returns: a factory ``factory(*, steps, cross_replace_steps, self_replace_steps, token_map,
    pairs, batch, self_replace_max_tokens, record, column_replace_steps, reweight)`` that builds
    one edit's :class:`~t2ialign.core.protocols.AttentionEditControl` (the arguments are those of
    :class:`~t2ialign.plugins.extractors.unet_editing.AttentionEditController`), or ``None`` when
    this plugin cannot edit the backbone's attention (answer by inspecting
    ``backbone.attention_kind``). When no plugin answers, editing refuses the backbone and says
    why.
    """


@hookspec(firstresult=True)
def t2ialign_make_weighting(prediction_type: str, scheme: str) -> Weighting | None:
    """Build the ELBO integrand for one training objective and one weighting scheme.

    Called: by the ELBO engine before estimating class likelihoods.
    Gets: the backbone's native prediction type (``"epsilon"``, ``"v_prediction"``, ``"flow"``,
    or a third-party one) and the scheme name (``"uniform"``: what the reference code sums;
    ``"elbo"``: the continuous-time ELBO with importance-sampled timesteps).
    Returns: a :class:`~t2ialign.core.protocols.Weighting`, or ``None`` when this plugin does
    not handle that (prediction type, scheme) pair.
    """


@hookspec(firstresult=True)
def t2ialign_make_task(spec: EntrySpec) -> Task | None:
    """Build a downstream task (``segmentation``, ``generation``, ``editing``, ...).

    Called: by ``t2ialign eval TASK`` and the task-specific commands.
    Gets: the task entry (``spec.plugin`` names the task implementation).
    Returns: a :class:`~t2ialign.core.protocols.Task`, or ``None`` when not this plugin's.
    """


@hookspec(firstresult=True)
def t2ialign_make_dataset(spec: EntrySpec, split: str) -> Dataset | None:
    """Open a dataset of images with masks and candidate classes, or of prompts.

    Called: at the start of an evaluation, once per split it needs (e.g. ``val`` to tune the
    background threshold, then ``test``).
    Gets: the dataset entry (``spec.options["root"]`` is already ``${VAR}``-expanded) and the
    split name.
    Returns: a :class:`~t2ialign.core.protocols.Dataset`, or ``None`` when not this plugin's.
    Must raise a :class:`~t2ialign.core.errors.T2IAlignError` naming the file it expected when
    the on-disk layout is wrong.
    """


@hookspec(firstresult=True)
def t2ialign_make_metric(spec: EntrySpec) -> Metric | None:
    """Build a metric with ``update``/``compute`` state that merges across processes.

    Called: by tasks that score their outputs.
    Gets: the metric entry.
    Returns: a :class:`~t2ialign.core.protocols.Metric`, or ``None`` when not this plugin's.
    """


@hookspec(firstresult=True)
def t2ialign_make_phrase_extractor(spec: EntrySpec) -> PhraseExtractor | None:
    """Build the noun-phrase extractor used by compositional generation and editing.

    Called: when a task needs the phrases of a prompt and the user did not pass them.
    Gets: the phrase-extractor entry (``"auto"`` picks spaCy when available, else rules).
    Returns: a :class:`~t2ialign.core.protocols.PhraseExtractor`, or ``None``.
    """


@hookspec
def t2ialign_registry_files() -> list[str]:
    """Contribute extra registry YAML files (paths) from a plugin package.

    Called: once when the registry is loaded; the files are read after the built-in
    ``registry.yaml`` and before any ``--registry FILE`` of the user, so users can override
    what packages declare.
    Returns: a list of file paths (``str`` or ``os.PathLike``); may be empty.
    """


@hookspec
def t2ialign_add_commands(subparsers: Any) -> None:
    """Add subcommands to the ``t2ialign`` command line.

    Called: once when the CLI builds its parser, on the plugins of the entry-point group
    ``t2ialign.commands`` (plus, for compatibility, third-party plugins of the main group that
    have no entry of the same name there). Declare the command in a light module under that
    group, named like the plugin it fronts (so ``-p no:NAME`` removes both): it should import
    only the standard library and light ``t2ialign.core`` modules at import time and import its
    heavy machinery (torch, models) inside the handler, so that ``t2ialign --help`` and usage
    errors never wait for them.
    Gets: the ``argparse`` sub-parsers object; call ``subparsers.add_parser(name, ...)`` and
    ``set_defaults(handler=callable)`` where ``callable(args, host) -> int`` is the command.
    ``host`` behaves as a :class:`~t2ialign.core.host.Host` and is built (every plugin
    imported) when the handler first uses it. ``t2ialign.core.cli`` offers ``add_run_options``,
    ``add_word_list`` (a word list in which ``key=value`` items are overrides) and range-checked
    option types (``number_in``, ``int_at_least``).
    Returns: nothing.
    """
