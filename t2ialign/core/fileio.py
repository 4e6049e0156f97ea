"""Crash-safe file output: atomic writes, append-only JSON lines, and an output-folder lock."""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from t2ialign.core.errors import InputError, RunLockedError


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove it is writable, else raise a clear error."""
    if path.exists() and not path.is_dir():
        raise InputError(f"output folder {path} is an existing file, not a folder", where=str(path),
                         fix="choose another folder with --output (the file is left as it is)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise InputError(
            f"output folder {path} is not writable: {exc.strerror or exc}",
            where=str(path),
            fix="choose another folder with --output, or fix its permissions",
        ) from exc
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            # mkstemp creates 0600 files; give the result the permissions a plain open() would
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj, indent=2) + "\n")


def to_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj``: NaN and +-Inf become ``null``, never the invalid ``NaN`` token.

    Python's ``json`` writes ``NaN``/``Infinity`` by default, which no other JSON reader accepts.
    An undefined number (the mean of no items, an IoU without pixels) is written as ``null``;
    ``allow_nan=False`` then guarantees that nothing non-finite slipped through. Arrays and
    tensors (anything with ``tolist``) and paths are converted too.
    """
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return _finite(_json_default(obj))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a single ``write`` of a whole line, then fsync.

    A crash can leave at most a truncated last line, which :func:`read_jsonl` drops. Non-finite
    numbers are written as ``null`` (see :func:`to_json`).
    """
    line = to_json(record, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def repair_jsonl(path: Path) -> bool:
    """Cut a torn (unterminated) last line off a JSON-lines file before appending to it.

    Without this, the first append of a resumed run would be glued onto the torn line of the
    killed run, turning a harmless tail into a corrupt line in the middle. Returns whether
    anything was cut.
    """
    path = Path(path)
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    keep = data.rfind(b"\n") + 1  # 0 when the only line is torn
    with open(path, "r+b") as fh:
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file, skipping a torn (unterminated or unparsable) last line."""
    if not Path(path).exists():
        return
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for i, line in enumerate(lines):
        if not line.endswith("\n"):
            break  # torn write of a killed run
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise


class OutputLock:
    """Exclusive lock on an output folder; a lock left by a dead process is taken over."""

    def __init__(self, folder: Path, name: str = ".t2ialign.lock"):
        self.path = Path(folder) / name
        self.acquired = False

    def __enter__(self) -> "OutputLock":
        info = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    try:
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                holder = self._holder()
                raise RunLockedError(
                    f"another run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}) is writing to this output folder",
                    where=str(self.path.parent),
                    fix=f"wait for it to finish, use another --output, or delete {self.path} if that run is gone",
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh)
            self.acquired = True
            return self
        raise RunLockedError("could not take the output-folder lock", where=str(self.path))

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self) -> bool:
        holder = self._holder()
        if not holder:
            # unreadable or half-written lock: stale if older than a minute
            try:
                return time.time() - self.path.stat().st_mtime > 60
            except FileNotFoundError:
                return True
        if holder.get("host") != socket.gethostname():
            return False
        pid = int(holder.get("pid", -1))
        if pid <= 0:
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def __exit__(self, *exc: Any) -> None:
        if self.acquired:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.acquired = False
