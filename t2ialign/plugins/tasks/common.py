"""Small helpers shared by task plugins (generation now; segmentation and editing can move here).

``check_resume`` is the keyed version of the resume guard every task needs: a rerun into an
output folder resumes only when the result-defining config keys are unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from t2ialign.core.errors import ConfigError


def check_resume(out: Path, config: dict[str, Any], keys: Sequence[str]) -> None:
    """Refuse to mix a new config into an output folder holding another run's results.

    ``keys``: the config keys whose change invalidates stored per-item records.
    """
    import yaml

    path = Path(out) / "config.yaml"
    if not path.exists():
        return
    old = yaml.safe_load(path.read_text()) or {}
    changed = [k for k in keys if old.get(k) != config.get(k)]
    if changed:
        raise ConfigError(
            f"output folder {out} holds a run made with different {', '.join(changed)}",
            where=str(path),
            fix="use another --output, or delete the folder to start over (a rerun with the same "
                "config resumes where it stopped)",
        )


__all__ = ["check_resume"]
