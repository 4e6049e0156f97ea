"""What a run prints besides its results: our progress bars on, third-party chatter off.

The CLI calls :func:`configure` once, before anything heavy is imported: by default the progress
bars and log warnings of transformers, diffusers, huggingface_hub and friends are silenced (a
"Loading weights" bar for a 52-tensor toy model tells a user nothing), ``-v`` keeps them.
Our own bars (:func:`progress_disabled`) stay on for long work, and are off when stdout is not
a terminal (logs, CI, pipes) or ``--quiet`` is given. Library users who never call
:func:`configure` get every library's own defaults.
"""

from __future__ import annotations

import os
import sys
import warnings

#: packages whose log messages, warnings and progress bars are quiet unless -v is given
THIRD_PARTY = ("transformers", "diffusers", "huggingface_hub", "accelerate", "torch", "torchvision",
               "torchmetrics", "open_clip", "timm", "safetensors")

_state = {"quiet": False, "verbose": True}


def configure(verbose: bool = False, quiet: bool = False) -> None:
    """Set the output policy of this process (see module docstring)."""
    _state["quiet"], _state["verbose"] = bool(quiet), bool(verbose)
    if verbose:
        return
    # read by the libraries when they are first imported, which is after this call: nothing
    # heavy is imported just to silence it (an explicit setting of the user's is kept)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    pattern = r"(%s)(\.|$)" % "|".join(THIRD_PARTY)
    warnings.filterwarnings("ignore", module=pattern)
    quiet_loaded_libraries()


def quiet_loaded_libraries() -> None:
    """Switch off the progress bars of libraries already imported (diffusers ignores the env)."""
    if _state["verbose"]:
        return
    for name in ("diffusers", "transformers"):
        if name in sys.modules:
            try:
                logging = __import__(f"{name}.utils.logging", fromlist=["x"])
                logging.set_verbosity_error()
                logging.disable_progress_bar()
            except (ImportError, AttributeError):  # another version without the switch: stay loud
                pass


def progress_disabled() -> bool:
    """Whether our own progress bars should be off: ``--quiet``, or stdout is not a terminal."""
    if _state["quiet"]:
        return True
    try:
        return not sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return True
