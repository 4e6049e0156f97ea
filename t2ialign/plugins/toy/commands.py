"""``t2ialign train-toy``: train the built-in toy text-to-image model and toy CLIP from scratch.

Every stage is resumable: re-running the same command with the same ``--output`` continues from
the last checkpoint of each stage (finished stages are skipped, the export is redone).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from t2ialign.core.errors import ConfigError
from t2ialign.core.fileio import ensure_writable_dir
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.specs import PluginInfo

STAGES = ("vae", "unet", "model", "clip", "eval-clip", "all")


@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(description="the train-toy command: trains the built-in toy SD model and toy CLIP")


@hookimpl
def t2ialign_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train-toy", help="train the toy text-to-image model / toy CLIP on the shapes world (CPU, resumable)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES, default="all",
                   help="vae | unet | model (= vae then unet) | clip | eval-clip | all (model, clip, eval-clip)")
    p.add_argument("--output", default="runs/toy", help="checkpoint/log folder (default runs/toy)")
    p.add_argument("--export", default=None,
                   help="folder receiving toy/ and toy_clip/ (default: the package's t2ialign/assets)")
    p.add_argument("--no-export", action="store_true", help="keep results in --output only")
    p.add_argument("--preset", choices=("full", "tiny"), default="full", help="tiny = seconds-sized smoke run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training option (JSON value), e.g. --set unet_steps=8000")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bars (default: on when stdout is a terminal and -q is not given)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show third-party log messages, warnings and progress bars")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars at all")
    p.set_defaults(handler=cmd_train_toy)


def _overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"'--set {item}' is not KEY=VALUE", where="train-toy command line",
                              fix="write e.g. --set unet_steps=8000")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _pick(overrides: dict[str, Any], known: dict[str, Any], stage: str) -> dict[str, Any]:
    """The overrides meant for one config; with ``--stage all`` a key may belong to the other one."""
    if stage != "all":
        return overrides  # from_dict rejects unknown keys with the list of valid ones
    from t2ialign.plugins.toy.clip import ToyClipConfig
    from t2ialign.plugins.toy.train import ToyTrainConfig

    valid = set(ToyTrainConfig().to_dict()) | set(ToyClipConfig().to_dict())
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ConfigError(f"unknown training options {unknown}", where="train-toy --set",
                          fix=f"use only {sorted(valid)}")
    return {k: v for k, v in overrides.items() if k in known}


def cmd_train_toy(args: argparse.Namespace, host: Any) -> int:
    from t2ialign.core.console import progress_disabled
    from t2ialign.plugins.toy import train

    if args.progress is None:
        args.progress = not progress_disabled()
    out = ensure_writable_dir(Path(args.output))
    export_root = None if args.no_export else Path(args.export) if args.export else train.ASSETS
    stage = args.stage
    overrides = _overrides(args.set)
    if stage in ("vae", "unet", "model", "all"):
        base = train.ToyTrainConfig.tiny() if args.preset == "tiny" else train.ToyTrainConfig.full()
        cfg = train.ToyTrainConfig.from_dict({**base.to_dict(), **_pick(overrides, base.to_dict(), stage)})
        export = None if export_root is None else export_root / "toy"
        if stage == "vae":
            print(f"vae: {train.train_vae(cfg, out, args.progress)}")
        elif stage == "unet":
            print(f"pipeline: {train.train_unet(cfg, out, export, args.progress)}")
        else:
            print(f"pipeline: {train.train_all(cfg, out, export, args.progress)}")
    if stage in ("clip", "eval-clip", "all"):
        from t2ialign.plugins.toy import clip as toy_clip

        base_c = toy_clip.ToyClipConfig.tiny() if args.preset == "tiny" else toy_clip.ToyClipConfig()
        ccfg = toy_clip.ToyClipConfig.from_dict({**base_c.to_dict(), **_pick(overrides, base_c.to_dict(), stage)})
        clip_dir = None if export_root is None else export_root / "toy_clip"
        if stage in ("clip", "all"):
            clip_dir = toy_clip.train_clip(ccfg, out, clip_dir, args.progress)
        if clip_dir is None:
            clip_dir = out / "clip" / "final"
        import torch

        torch.set_num_threads(ccfg.threads)
        result = toy_clip.eval_swap_accuracy(clip_dir, n=ccfg.eval_images, seed=ccfg.seed)
        print(json.dumps(result, indent=2))
    return 0
