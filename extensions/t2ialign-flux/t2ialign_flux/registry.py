"""Contributes this package's registry file (ready ``backbones`` entries) through ``t2ialign_registry_files``."""

from __future__ import annotations

from importlib import resources

from t2ialign.core.hookspecs import hookimpl


@hookimpl
def t2ialign_registry_files() -> list[str]:
    return [str(resources.files("t2ialign_flux").joinpath("registry.yaml"))]
