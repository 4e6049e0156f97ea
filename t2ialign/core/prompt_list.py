"""A dataset of prompts: the container every prompt-set plugin returns, and its ``limit`` option check.

Prompt sets (prompt files, the toy world's prompts, third-party lists) are plain lists of
:class:`~t2ialign.core.protocols.Sample` with a ``prompt``; they have no label ids.
"""

from __future__ import annotations

from typing import Any

from t2ialign.core.errors import ConfigError
from t2ialign.core.protocols import Sample


def check_limit(limit: Any, where: str) -> int | None:
    """A prompt set's ``limit`` option: ``None`` (all prompts) or a non-negative integer."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ConfigError(f"limit must be a non-negative integer or null, got {limit!r}", where=where,
                          fix="e.g. limit: 1000 (the reference's cap)")
    return limit


class PromptList:
    """A list of prompt samples; satisfies :class:`t2ialign.core.protocols.Dataset`."""

    def __init__(self, name: str, split: str, samples: list[Sample]):
        self.name = name
        self.split = split
        self.class_names: list[str] = []  # prompt sets have no label ids
        self._samples = samples

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> Sample:
        return self._samples[index]


__all__ = ["PromptList", "check_limit"]
