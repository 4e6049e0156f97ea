"""What a run prints besides its results: our progress bars on, third-party chatter off.

The CLI calls :func:`configure` once, before anything heavy is imported: by default the progress
bars and log warnings of transformers, diffusers, huggingface_hub and friends are silenced (a
"Loading weights" bar for a 52-tensor toy model tells a user nothing), ``-v`` keeps them.
Our own bars (:func:`progress_disabled`) stay on for long work, and are off when stdout is not
a terminal (logs, CI, pipes) or ``--quiet`` is given. Library users who never call
:func:`configure` get every library's own defaults.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Any

#: packages whose log messages, warnings and progress bars are quiet unless -v is given
THIRD_PARTY = ("transformers", "diffusers", "huggingface_hub", "accelerate", "torch", "torchvision",
               "torchmetrics", "open_clip", "timm", "safetensors")

_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
_PATTERN = r"(%s)(\.|$)" % "|".join(THIRD_PARTY)

_state: dict[str, Any] = {"quiet": False, "verbose": True, "env_set": [], "silenced": False}


def configure(verbose: bool = False, quiet: bool = False) -> None:
    """Set the output policy of this process (see module docstring); a later call undoes an earlier one."""
    _state["quiet"], _state["verbose"] = bool(quiet), bool(verbose)
    if verbose:
        _unsilence()
        return
    # read by the libraries when they are first imported, which is after this call: nothing
    # heavy is imported just to silence it (a setting of the user's own is kept)
    for key, value in _ENV.items():
        if key not in os.environ:
            os.environ[key] = value
            _state["env_set"].append(key)
    warnings.filterwarnings("ignore", module=_PATTERN)
    _state["silenced"] = True
    quiet_loaded_libraries()


def _unsilence() -> None:
    """Give the libraries their own defaults back (``main()`` can run twice in one process)."""
    if not _state["silenced"]:
        return
    for key in _state["env_set"]:
        os.environ.pop(key, None)
    _state["env_set"] = []
    warnings.filters[:] = [f for f in warnings.filters
                           if not (f[0] == "ignore" and getattr(f[3], "pattern", None) == _PATTERN)]
    with warnings.catch_warnings():  # huggingface_hub read its env variable at import: it may object
        warnings.simplefilter("ignore")
        for logging in _loaded_logging():
            logging.set_verbosity_warning()
            logging.enable_progress_bar()
    _state["silenced"] = False


def _loaded_logging() -> list[Any]:
    out = []
    for name in ("diffusers", "transformers"):
        if name in sys.modules:
            try:
                out.append(importlib.import_module(f"{name}.utils.logging"))
            except ImportError:  # pragma: no cover - a version without it
                pass
    return out


def quiet_loaded_libraries() -> None:
    """Switch off the progress bars of libraries already imported (diffusers ignores the env)."""
    if _state["verbose"]:
        return
    for logging in _loaded_logging():
        try:
            logging.set_verbosity_error()
            logging.disable_progress_bar()
        except AttributeError:  # pragma: no cover - another version without the switch: stays loud
            pass


def progress_disabled() -> bool:
    """Whether our own progress bars should be off: ``--quiet``, or stdout is not a terminal."""
    if _state["quiet"]:
        return True
    try:
        return not sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return True
