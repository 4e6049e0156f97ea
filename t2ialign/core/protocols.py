"""Typed protocols of the objects plugins return, and the small records they exchange.

The host only relies on what is written here. A third-party backbone, weighting, dataset,
metric or task that satisfies these protocols works with every built-in pipeline.

Timestep convention used everywhere: ``t`` is a float tensor of *timestep indices* in
``[0, num_train_timesteps - 1]`` (integers for the reference grids, any real value for
importance-sampled ELBO timesteps). What an index means (``alphas_cumprod`` position for DDPM
models, position in the flipped flow-matching sigma table for SD3) is the backbone's business;
the rest of the toolkit only asks it for ``alpha_sigma(t)`` and ``log_snr(t)``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:  # annotations only: the host imports the plugin manager and the registry
    from t2ialign.core.host import Host


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerInfo:
    """One attention layer of a denoiser.

    ``name``: module path of the ``Attention`` module (``down_blocks.0.attentions.0.transformer_blocks.0.attn2``).
    ``kind``: ``"cross"`` (image queries, text keys), ``"self"`` (image-image) or ``"joint"``
    (MM-DiT: one softmax over image and text keys, split by the extractor).
    ``grid``: ``(h, w)`` of the image-token grid this layer sees.
    ``group``: resolution-group index; a new group starts whenever ``grid`` changes along the
    forward order of layers of this kind (the reference ``cross_weight`` is indexed by it).
    ``depth``: position in forward order among layers of the same kind.
    ``place``: ``"down"``, ``"mid"``, ``"up"`` for UNets, ``"block"`` for transformers.
    """

    name: str
    kind: str
    grid: tuple[int, int]
    group: int
    depth: int
    place: str


@dataclass
class TextCond:
    """Encoded prompts, batched along dim 0 of every tensor.

    ``embeds``: token embeddings the denoiser attends to, ``(B, L, D)``.
    ``pooled``: pooled embeddings for models that use them (SDXL, SD3), ``(B, P)`` or ``None``.
    ``extra``: other per-sample tensors a backbone needs (e.g. SDXL ``time_ids``), dim 0 = batch.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def select(self, index: torch.Tensor | Sequence[int]) -> "TextCond":
        """Rows ``index`` of every tensor (repeats allowed) — used to batch classes x timesteps."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.embeds.device)
        return TextCond(
            embeds=self.embeds.index_select(0, idx),
            pooled=None if self.pooled is None else self.pooled.index_select(0, idx.to(self.pooled.device)),
            extra={k: v.index_select(0, idx.to(v.device)) for k, v in self.extra.items()},
        )

    @staticmethod
    def cat(conds: Sequence["TextCond"]) -> "TextCond":
        """Concatenate along the batch dimension."""
        first = conds[0]
        return TextCond(
            embeds=torch.cat([c.embeds for c in conds]),
            pooled=None if first.pooled is None else torch.cat([c.pooled for c in conds]),  # type: ignore[misc]
            extra={k: torch.cat([c.extra[k] for c in conds]) for k in first.extra},
        )


@dataclass
class Sample:
    """One dataset item.

    Segmentation datasets fill ``image`` (``H x W x 3`` uint8 RGB), ``mask`` (``H x W`` int64,
    0 = background, 1..C = classes, 255 = ignore) and ``classes`` (candidate label ids, for the
    referring protocol the labels present in ``mask``). Prompt datasets fill ``prompt`` (and
    optionally ``phrases``). ``meta`` carries anything else (size buckets, source file...).
    """

    id: str
    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    classes: list[int] = field(default_factory=list)
    prompt: str | None = None
    phrases: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class TimestepPlan:
    """Where to evaluate the ELBO integrand and how to weight each evaluation.

    ``t``: timestep indices (float, shape ``(T,)``); ``weight``: multiplier of each term so that
    ``mean_k(weight_k * term_k)`` is the scheme's estimate (shape ``(T,)``).
    """

    t: torch.Tensor
    weight: torch.Tensor


# --------------------------------------------------------------------------------------------
# protocols
# --------------------------------------------------------------------------------------------
@runtime_checkable
class Backbone(Protocol):
    """A frozen text-to-image denoiser with its VAE and text encoder(s)."""

    name: str
    #: ``"epsilon"``, ``"v_prediction"`` or ``"flow"`` (velocity ``eps - z0`` of rectified flow)
    prediction_type: str
    #: which extractor family hooks it: ``"unet"`` (separate cross/self attention) or ``"mmdit"``
    attention_kind: str
    device: torch.device
    dtype: torch.dtype
    #: square pixel size images are resized to before VAE encoding
    image_size: int
    num_train_timesteps: int
    #: the denoiser module whose attention processors extractors replace
    denoiser: torch.nn.Module
    #: text-token axis length of the cross-attention maps (77 for CLIP-conditioned UNets)
    max_tokens: int

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float RGB in ``[0, 1]`` -> scaled latent ``z0`` (VAE posterior mean)."""

    def encode_text(self, prompts: Sequence[str]) -> TextCond:
        """Encode prompts once (no CFG, conditional branch only)."""

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signal and noise scales ``z_t = alpha * z0 + sigma * eps`` at timestep indices ``t``."""

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """``lambda(t) = log(alpha^2 / sigma^2)``; strictly decreasing in ``t``."""

    def add_noise(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward-noise ``z0`` to timestep indices ``t`` (one per batch row)."""

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        """The denoiser's native prediction (see ``prediction_type``), returned as float32."""

    def token_spans(self, prompt: str, phrase: str) -> list[int]:
        """Positions of ``phrase``'s tokens on the text axis of this backbone's attention maps."""

    def attention_layers(self) -> list[LayerInfo]:
        """All attention layers of the denoiser in forward order."""


@runtime_checkable
class AttentionExtractor(Protocol):
    """Installs capturing attention processors on a backbone's denoiser."""

    def capture(
        self,
        *,
        cross_layers: Sequence[str] | None = None,
        self_layers: Sequence[str] | None = None,
        token_indices: Sequence[int] | None = None,
        keep_steps: bool = False,
    ) -> AbstractContextManager[Any]:
        """Context manager yielding an :class:`~t2ialign.core.attention_store.AttentionStore`.

        Only ``cross_layers`` / ``self_layers`` (layer names, ``None`` = all of that kind,
        ``[]`` = none) materialise probabilities; ``token_indices`` restricts stored cross maps
        to those text columns. Original processors are restored on exit, also on error; zero
        hooked layers raises at once.
        """


@runtime_checkable
class AttentionEditControl(Protocol):
    """One edit's Prompt-to-Prompt attention control, built by the factory that
    ``t2ialign_make_attention_editor`` returns.

    ``step``: the sampling step the next denoiser call belongs to (set by the editor before each
    call; the schedules compare against it). ``pairs``: ``(source_row, target_row)`` of the
    denoiser batch whose target rows are edited. ``records``: with ``record=True``, one dict per
    edited layer call (``step``, ``kind``, ``name``, ``before``, ``after`` probabilities).
    ``layers``: how many layers :meth:`installed` hooked.
    """

    step: int
    pairs: list[tuple[int, int]]
    records: list[dict[str, Any]]
    layers: int

    def installed(self, backbone: Backbone) -> AbstractContextManager[Any]:
        """Context manager within which the backbone's denoiser calls are edited; its original
        attention processors are restored on exit, also on error."""


@runtime_checkable
class Weighting(Protocol):
    """Turns a backbone's native prediction into the terms of an ELBO estimate."""

    prediction_type: str
    scheme: str

    def plan(
        self, backbone: Backbone, grid: torch.Tensor, generator: torch.Generator
    ) -> TimestepPlan:
        """Timesteps and weights. ``grid`` is the parsed timestep spec (its size sets the count)."""

    def term(
        self,
        pred: torch.Tensor,
        *,
        z0: torch.Tensor,
        noise: torch.Tensor,
        z_t: torch.Tensor,
        alpha: torch.Tensor,
        sigma: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample integrand ``(B,)`` before the plan's weight (lower = better explained)."""


@runtime_checkable
class Dataset(Protocol):
    """A sized, indexable collection of :class:`Sample`."""

    name: str
    split: str
    #: display / prompt word of each label id; index 0 is the background
    class_names: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


@runtime_checkable
class Metric(Protocol):
    """Accumulating metric whose state merges across processes (torchmetrics style)."""

    def update(self, *args: Any, **kwargs: Any) -> Any:
        """Add a batch to the state.

        A metric may return what it computed for the batch (per-image CLIP scores, per-image oracle
        verdicts) for a caller that wants it; the host and the built-in tasks never rely on a
        return value (they read :meth:`compute`), so ``None`` is as good an answer.
        """

    def compute(self) -> dict[str, Any]: ...

    def reset(self) -> None: ...

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that fully describe the accumulated state (summable across processes)."""

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        """Add another process's :meth:`state` into this one."""


@runtime_checkable
class Task(Protocol):
    """A downstream job: segmentation, generation, editing..."""

    name: str
    #: nested defaults; ``--config`` files and ``key=value`` overrides are checked against them
    defaults: dict[str, Any]

    def run(self, config: dict[str, Any], host: Host) -> dict[str, Any]:
        """Run with a resolved config; write outputs under ``config["output"]``; return results.

        ``host`` builds what the task needs by registry name (``host.backbone(...)``,
        ``host.dataset(...)``, ``host.metric(...)``); from the command line it is a stand-in
        that builds the :class:`~t2ialign.core.host.Host` on first use.
        """


@runtime_checkable
class PhraseExtractor(Protocol):
    """Splits a prompt into its noun phrases ("a red cube and a blue sphere" -> 2 phrases)."""

    def __call__(self, prompt: str) -> list[str]: ...
