"""Command-line front end of the generation task: ``t2ialign generate "PROMPT"``.

A light command module (entry-point group ``t2ialign.commands``, name ``generation``): nothing
heavy is imported until the command runs, so ``--help`` and usage errors are instant;
``-p no:generation`` removes it together with the task. Draws one prompt with and without ELBO
phrase weighting from the same seed and writes both images, a side-by-side panel and
``generate.json`` (phrases, token spans, per-step weights).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from t2ialign.core.errors import InputError
from t2ialign.core.hookspecs import hookimpl

#: the generation task's config keys that apply to one prompt
GENERATE_KEYS = ("backbone", "device", "dtype", "seed", "steps", "guidance", "negative", "strength", "elbo_steps",
                 "phrase_extractor")


def cmd_generate(args: argparse.Namespace, host: Any) -> int:
    """Baseline and ELBO-weighted images of one prompt, side by side."""
    from t2ialign.core.cli import run_overrides
    from t2ialign.core.config import resolve_config
    from t2ialign.core.fileio import atomic_write_json, ensure_writable_dir
    from t2ialign.core.report import panel, save_png
    from t2ialign.core.phrases import resolve_phrases
    from t2ialign.plugins.tasks.generation import DEFAULTS, _check_config, _scale_for, generate_pair

    prompt = (args.prompt or "").strip()
    if not prompt:
        raise InputError("the prompt is empty", where="t2ialign generate", fix='e.g. t2ialign generate "a red star and a blue circle"')
    defaults = {k: DEFAULTS[k] for k in GENERATE_KEYS}
    defaults["output"] = "runs/generate"
    config = resolve_config(defaults, args.config,
                            run_overrides(args, ["backbone", "device", "seed", "steps", "guidance", "strength"]))
    _check_config({**DEFAULTS, **config})
    out = ensure_writable_dir(Path(config["output"]))
    explicit = args.phrases or None
    extractor = None if explicit else host.phrase_extractor(config["phrase_extractor"])
    phrases = resolve_phrases(prompt, explicit, extractor)
    backbone = host.backbone(config["backbone"], device=config["device"], dtype=config["dtype"])
    pair = generate_pair(backbone, prompt, phrases, seed=config["seed"], steps=config["steps"],
                         guidance=config["guidance"], strength=config["strength"], elbo_steps=config["elbo_steps"],
                         negative=config["negative"])
    save_png(out / "baseline.png", pair.baseline)
    save_png(out / "weighted.png", pair.weighted)
    scale = _scale_for(pair.baseline)
    save_png(out / "side_by_side.png", panel([("baseline", pair.baseline), ("ELBO-weighted", pair.weighted)], scale=scale))
    summary = pair.weighting.summary()
    atomic_write_json(out / "generate.json", {"prompt": prompt, "phrases": phrases, "spans": pair.spans,
                                              "seed": pair.seed, "weights": summary, "trace": pair.weighting.log,
                                              "config": config, "timings": pair.timings})
    print(f"phrases: {phrases}")
    if summary.get("steps_weighted"):
        print("mean weights: " + ", ".join(f"{p}={w:.3f}" for p, w in zip(phrases, summary["mean"])))
    else:
        print("no weighting applied (needs at least two phrases and strength > 1)")
    print(f"outputs: {out / 'side_by_side.png'}")
    return 0


@hookimpl
def t2ialign_add_commands(subparsers: Any) -> None:
    from t2ialign.core.cli import add_run_options, add_word_list, int_at_least, number_in

    g = subparsers.add_parser("generate", help="draw a prompt with and without ELBO phrase weighting (same seed)",
                              epilog="key=value overrides may follow the phrases: --phrases 'a red star' "
                                     "'a blue circle' steps=20 (a phrase never contains '=')")
    g.add_argument("prompt", help='e.g. "a red star and a blue circle"')
    g.add_argument("--backbone", help="registry backbone name (default toy)")
    add_word_list(g, "--phrases", metavar="PHRASE", help="noun phrases to weight (default: extracted)")
    g.add_argument("--seed", type=int_at_least(0, "--seed 4307"), help="seed of the initial noise (default 4307)")
    g.add_argument("--steps", type=int_at_least(1, "--steps 50"), help="sampling steps (default 50)")
    g.add_argument("--guidance", type=number_in(0, None, example="--guidance 7.5"),
                   help="classifier-free guidance scale, >= 0 (default 7.5)")
    g.add_argument("--strength", type=number_in(1, None, example="--strength 1.2"),
                   help="ELBO weighting strength, >= 1; 1 = no weighting (default 1.2)")
    g.add_argument("--device", help="torch device")
    add_run_options(g)
    g.set_defaults(handler=cmd_generate)
