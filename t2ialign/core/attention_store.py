"""Running means of captured attention probabilities, filled by extractor processors.

Processors call :meth:`AttentionStore.add` with the probabilities of one layer for one forward
call, shaped ``(B, heads, Q, K)``. The store averages over heads at once (maps are never kept
per head), keeps a running sum per layer and batch row, and divides by the number of calls on
read. Nothing per step is kept unless ``keep_steps=True``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionStore:
    """Head-averaged, call-averaged attention maps per layer.

    ``cross[name]``: ``(B, Q, K_selected)`` mean image->text probabilities.
    ``self_[name]``: ``(B, Q, Q)`` mean image->image probabilities.
    ``hooked``: number of hooked layers by kind, set by the extractor.
    ``steps``: per-call maps when ``keep_steps`` (list of ``(kind, name, tensor)``).
    ``dtype``: accumulation dtype (float32 keeps long running sums exact enough).
    ``reduce_batch``: also average over batch rows at once (rows are then weighted equally across
    calls of different batch sizes). Pipelines that batch several noised copies of ONE image set
    it, so a 4096x4096 self map is kept once, not once per row.
    """

    keep_steps: bool = False
    reduce_batch: bool = False
    dtype: torch.dtype = torch.float32
    hooked: dict[str, int] = field(default_factory=dict)
    _sums: dict[str, dict[str, torch.Tensor]] = field(default_factory=lambda: {"cross": {}, "self": {}})
    _calls: dict[str, dict[str, int]] = field(default_factory=lambda: {"cross": defaultdict(int), "self": defaultdict(int)})
    steps: list[tuple[str, str, torch.Tensor]] = field(default_factory=list)

    def add(self, kind: str, name: str, probs: torch.Tensor) -> None:
        """Add one call's probabilities ``(B, heads, Q, K)`` of layer ``name`` (kind cross/self)."""
        mean = probs.detach().to(self.dtype).mean(dim=1)
        rows = 1
        if self.reduce_batch:
            rows = int(mean.shape[0])
            mean = mean.sum(dim=0, keepdim=True)
        sums = self._sums[kind]
        if name in sums and sums[name].shape == mean.shape:
            sums[name] += mean
        elif name in sums:
            raise ValueError(
                f"layer {name}: map shape changed between calls ({tuple(sums[name].shape)} -> "
                f"{tuple(mean.shape)}); use one store per batch shape"
            )
        else:
            sums[name] = mean.clone()
        self._calls[kind][name] += rows
        if self.keep_steps:
            self.steps.append((kind, name, mean.cpu()))

    def _means(self, kind: str) -> dict[str, torch.Tensor]:
        return {n: s / self._calls[kind][n] for n, s in self._sums[kind].items()}

    @property
    def cross(self) -> dict[str, torch.Tensor]:
        """Mean cross maps ``(B, Q, K)`` per layer name."""
        return self._means("cross")

    @property
    def self_(self) -> dict[str, torch.Tensor]:
        """Mean self maps ``(B, Q, Q)`` per layer name."""
        return self._means("self")

    def calls(self, kind: str, name: str) -> int:
        """Number of forward calls (or of batch rows with ``reduce_batch``) averaged for a layer."""
        return self._calls[kind][name]

    def reset(self) -> None:
        for kind in ("cross", "self"):
            self._sums[kind].clear()
            self._calls[kind].clear()
        self.steps.clear()
