"""Seconds-sized toy training configurations for the tests."""

from __future__ import annotations

from t2ialign.plugins.toy import train


def tiny(**changes) -> train.ToyTrainConfig:
    """``ToyTrainConfig.tiny()`` on one thread, with ``changes`` applied (checked like CLI overrides)."""
    return train.ToyTrainConfig.from_dict({**train.ToyTrainConfig.tiny().to_dict(), "threads": 1, **changes})
