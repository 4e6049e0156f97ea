"""Shared set-up of the extension's tests: no network, few threads, deterministic seeds, tiny models.

The tests load this package through t2ialign's plugin manager, i.e. from its installed entry
points (``pip install -e extensions/t2ialign-flux``), exactly as a user's installation does.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    """These tests exercise the INSTALLED distribution (its entry points); say so if it is missing."""
    import importlib.metadata as md

    try:
        md.distribution("t2ialign-flux")
    except md.PackageNotFoundError:
        raise pytest.UsageError(
            "t2ialign-flux is not installed, so t2ialign cannot find its plugins: run "
            "`python -m pip install -e extensions/t2ialign-flux` (from the repository root) first") from None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def write_registry(path: Path, section: str = "backbones", **entries: dict) -> Path:
    """A registry file with ``entries`` in ``section`` (JSON is valid YAML)."""
    path.write_text(json.dumps({section: entries}))
    return path


@pytest.fixture(scope="session")
def flux_folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny FLUX.1-dev (guidance-distilled) and -schnell (no guidance) folders, built once per session."""
    from tiny_flux import make_tiny_flux

    root = tmp_path_factory.mktemp("flux")
    return {"dev": make_tiny_flux(root / "dev", guidance_embeds=True),
            "schnell": make_tiny_flux(root / "schnell", guidance_embeds=False, seed=5)}


@pytest.fixture(scope="session")
def pixart_folder(tmp_path_factory) -> Path:
    """A tiny PixArt-Sigma folder, built once per session."""
    from tiny_pixart import make_tiny_pixart

    return make_tiny_pixart(tmp_path_factory.mktemp("pixart") / "model")
