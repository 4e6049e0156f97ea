"""Helpers every task plugin needs: process sharding, the resume guard, file names, versions.

``check_resume``: a rerun into an output folder resumes only when the result-defining config
keys are unchanged; ``check_weights`` adds the same guard for the weights behind a backbone name
(a registry override or a package update can put other weights behind ``toy`` or ``sd15``).
``Procs``: rank/world/barrier/gather through accelerate when launched with it, a single process
otherwise.
"""

from __future__ import annotations

import math
import platform
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from t2ialign import __version__

from t2ialign.core.errors import ConfigError
from t2ialign.core.fileio import OutputLock, ensure_writable_dir

if TYPE_CHECKING:
    from t2ialign.core.protocols import Backbone


def check_resume(out: Path, config: dict[str, Any], keys: Sequence[str]) -> None:
    """Refuse to mix a new config into an output folder holding another run's results.

    ``keys``: the config keys whose change invalidates stored per-item records.
    """
    import yaml

    path = Path(out) / "config.yaml"
    if not path.exists() or not any(Path(out).glob("records*.jsonl")):
        return  # nothing computed yet: nothing to mix up
    old = yaml.safe_load(path.read_text()) or {}
    changed = [k for k in keys if old.get(k) != config.get(k)]
    if changed:
        raise ConfigError(
            f"output folder {out} holds a run made with different {', '.join(changed)}",
            where=str(path),
            fix="use another --output, or delete the folder to start over (a rerun with the same "
                "config resumes where it stopped)",
        )



def weights_fingerprint(module: torch.nn.Module, samples: int = 64) -> str:
    """A cheap identity of a module's weights: names, shapes, dtypes and ``samples`` evenly spaced
    values of every parameter, hashed. Reads a few KB even for SDXL (no full hash of gigabytes),
    and one device sync in all; two trainings or checkpoints practically never share it."""
    import hashlib

    names, picks = [], []
    for name, p in module.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        picks.append(flat[::step][:samples].double())
        names.append(f"{name}:{tuple(p.shape)}:{p.dtype}")
    values = torch.cat(picks).cpu().numpy().tobytes() if picks else b""
    return hashlib.sha1("\n".join(names).encode() + values).hexdigest()[:16]


def check_weights(out: Path, backbone: Backbone) -> dict[str, str]:
    """Refuse to resume into ``out`` when its records came from other weights than ``backbone``'s.

    Compares the denoiser's :func:`weights_fingerprint` with the one kept in ``out/weights.json``
    and returns the current one for :func:`record_weights`. A folder from before this guard
    (records, no file) is trusted. Every process checks, so all of them stop together.
    """
    import json

    path = Path(out) / "weights.json"
    now = {"backbone": str(getattr(backbone, "name", "?")), "denoiser": weights_fingerprint(backbone.denoiser)}
    if path.exists() and any(Path(out).glob("records*.jsonl")):
        old = json.loads(path.read_text())
        if old.get("denoiser") != now["denoiser"]:
            raise ConfigError(
                f"output folder {out} holds results of other weights for backbone {old.get('backbone')!r} "
                f"(denoiser fingerprint {old.get('denoiser')} there, {now['denoiser']} now)",
                where=str(path),
                fix="use another --output, or delete the folder to start over with the current weights",
            )
    return now


def record_weights(out: Path, weights: dict[str, str]) -> None:
    """Keep the fingerprint next to ``config.yaml`` (written together, once the run could be set up:
    a run that fails on bad input leaves nothing behind)."""
    from t2ialign.core.fileio import atomic_write_json

    atomic_write_json(Path(out) / "weights.json", weights)


@contextmanager
def claimed_output(out: Path, config: dict[str, Any], keys: Sequence[str], procs: "Procs") -> Iterator[None]:
    """Hold a task's output folder for the length of a run.

    Rank 0 creates the folder, takes its lock and runs :func:`check_resume`; every process
    waits until that is done. The lock is released on exit, also on errors. A run that fails
    before its first record (a corrupt mask in the first image, Ctrl-C during the model load)
    removes what it created -- ``config.yaml``, ``weights.json``, empty folders, the output
    folder itself -- so nothing suggests a run that never produced anything; once records
    exist, everything stays for the resume.
    """
    lock = None
    out = Path(out)
    before: set[Path] | None = None
    created_root = False
    if procs.rank == 0:
        before = set(out.rglob("*")) if out.exists() else None
        created_root = not out.exists()
        ensure_writable_dir(out)
        lock = OutputLock(out).__enter__()
        try:
            check_resume(out, config, keys)
        except BaseException:
            lock.__exit__(None, None, None)
            raise
    procs.barrier()
    try:
        yield
    except BaseException:
        if procs.rank == 0:
            _remove_if_nothing_recorded(out, before or set(), lock.path if lock else None)
        raise
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
            if procs.rank == 0 and created_root and out.is_dir() and not any(out.iterdir()):
                out.rmdir()


def _remove_if_nothing_recorded(out: Path, before: set[Path], lock: Path | None) -> None:
    """Delete the files and empty folders a failed run added to ``out``, unless it recorded items."""
    if any(out.glob("records*.jsonl")):
        return
    added = sorted((p for p in out.rglob("*") if p not in before and p != lock), key=lambda p: -len(p.parts))
    for path in added:
        try:
            if path.is_dir():
                if not any(path.iterdir()):
                    path.rmdir()
            elif path.name in ("config.yaml", "weights.json"):  # the resume markers: only ones written before items
                path.unlink()
        except OSError:  # best effort: a leftover is better than masking the run's own error
            pass


def check_number(config: dict[str, Any], key: str, low: float, high: float | None = None, example: str = "") -> None:
    """Refuse a config number (``a.b`` for nested keys) that is NaN, infinite or outside ``[low, high]``.

    Checked before any work: a NaN threshold or guidance would otherwise run to the end and land
    in every record and in ``results.json``.
    """
    value: Any = config
    for part in key.split("."):
        value = value[part]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and value >= low and (high is None or value <= high)
    if not ok:
        span = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise ConfigError(f"{key} must be a finite number {span}, got {value!r}", where=f"config key {key}",
                          fix=f"e.g. {key}={example}" if example else None)


def safe_name(item_id: str) -> str:
    """``item_id`` as a file name: anything but letters, digits, ``-_.`` becomes ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(item_id))


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"t2ialign": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


# --------------------------------------------------------------------------------------------
# processes (accelerate when launched with it, a single process otherwise)
# --------------------------------------------------------------------------------------------
class Procs:
    def __init__(self) -> None:
        self.state = None
        try:
            from accelerate import PartialState

            state = PartialState(cpu=True) if not torch.cuda.is_available() else PartialState()
            if state.num_processes > 1:
                self.state = state
        except Exception:  # noqa: BLE001 - accelerate not configured: run single-process
            self.state = None

    @property
    def rank(self) -> int:
        return self.state.process_index if self.state else 0

    @property
    def world(self) -> int:
        return self.state.num_processes if self.state else 1

    def barrier(self) -> None:
        if self.state:
            self.state.wait_for_everyone()

    def gather(self, obj: Any) -> list[Any]:
        if not self.state:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def broadcast(self, obj: Any) -> Any:
        if not self.state:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]
