"""Command-line front end of the editing task: ``t2ialign edit IMAGE --source ... --target ...``.

A light command module (entry-point group ``t2ialign.commands``, name ``editing``): nothing heavy
is imported until the command runs, so ``--help`` and usage errors are instant; ``-p no:editing``
removes it together with the task. Edits one real image (DDIM inversion) twice -- with the blend mask from
uncalibrated heatmaps and from ELBO-calibrated ones -- and writes both edits, the masks, a
panel and ``edit.json`` (background PSNR/SSIM outside each mask, CLIP score when the configured
metric can be loaded).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from t2ialign.core.errors import InputError, T2IAlignError
from t2ialign.core.hookspecs import hookimpl


def _bare(word: str) -> str:
    """A caption word as it is compared: lower case, letters, digits and '-' only ("Circle," -> "circle")."""
    return "".join(c for c in word.lower() if c.isalnum() or c == "-")


def check_captions(source: str, target: str, words: Sequence[str] | None,
                   edit_words: Sequence[str] | None) -> tuple[str, str]:
    """Refuse captions and object words that cannot make an edit, before any model loads.

    Returns the captions with runs of whitespace collapsed. Refused: an empty caption, a target
    equal to the source (nothing to edit), and a ``--words`` / ``--edit-words`` word that does
    not occur in the source caption (its heatmap would be of a word the image was never
    described with, and the blend mask would cover an arbitrary region).
    """
    src, tgt = " ".join(source.split()), " ".join(target.split())
    for flag, text in (("--source", src), ("--target", tgt)):
        if not text:
            raise InputError(f"the {flag[2:]} caption is empty", where=f"t2ialign edit {flag}",
                             fix="give a caption such as 'a photo of a red circle'")
    if [_bare(w) for w in src.split()] == [_bare(w) for w in tgt.split()]:
        raise InputError(f"the source and target captions are the same ({src!r}): there is nothing to edit",
                         where="t2ialign edit --source/--target",
                         fix="change the object or attribute to edit in --target, e.g. --source 'a red circle' "
                             "--target 'a blue circle'")
    caption = [_bare(w) for w in src.split()]
    for flag, given in (("--words", words), ("--edit-words", edit_words)):
        for word in given or ():
            parts = [_bare(p) for p in word.split()]
            if not parts or not all(p and p in caption for p in parts):
                raise InputError(f"{flag} word {word!r} is not in the source caption {src!r}",
                                 where=f"t2ialign edit {flag}",
                                 fix=f"name words of the source caption (one of {sorted(set(caption))}); the "
                                     f"edit itself goes into --target")
    return src, tgt


def _nouns(host: Any, prompt: str, given: list[str] | None) -> list[str]:
    """The source's object words: ``--words``, else the head (last word) of each noun phrase."""
    if given:
        return list(dict.fromkeys(given))
    try:
        extractor = host.phrase_extractor()
    except T2IAlignError as exc:
        raise InputError("could not find the nouns of the source prompt", where="t2ialign edit",
                         fix="pass them with --words, e.g. --words circle star") from exc
    heads = [p.split()[-1].strip(",.;:!?").lower() for p in extractor(prompt)]
    return list(dict.fromkeys(h for h in heads if h))


def cmd_edit(args: argparse.Namespace, host: Any) -> int:
    """Edit one image from ``--source`` to ``--target`` with both blend variants."""
    from t2ialign.core.images import load_rgb

    # input checks first, before anything heavy is imported
    image = load_rgb(Path(args.image))
    args.source, args.target = check_captions(args.source, args.target, args.words, args.edit_words)

    import numpy as np

    from t2ialign.core.cli import run_overrides
    from t2ialign.core.config import dump_config, resolve_config
    from t2ialign.core.fileio import atomic_write_json, atomic_write_text, ensure_writable_dir, to_json
    from t2ialign.core.report import label_to_rgb, overlay, panel, save_png
    from t2ialign.plugins.tasks.common import check_number
    from t2ialign.plugins.tasks.editing.alignment import align_prompts, edited_nouns
    from t2ialign.plugins.tasks.editing.measurements import background_scores
    from t2ialign.plugins.tasks.editing.task import DEFAULTS, build_editor, variants_of

    # one image, no held-out scenes: the blend threshold is blend.threshold (tuned on toy val scenes)
    defaults = {**{k: v for k, v in DEFAULTS.items() if k != "threshold"}, "output": "runs/edit"}
    config = resolve_config(defaults, args.config, run_overrides(args, ["backbone", "device", "gamma"]))
    variants = variants_of(config)
    check_number(config, "blend.threshold", 0.0, 1.0, str(DEFAULTS["blend"]["threshold"]))
    check_number(config, "guidance", 0.0, None, str(DEFAULTS["guidance"]))
    out = ensure_writable_dir(Path(config["output"]))
    backbone = host.backbone(config["backbone"], device=config["device"], dtype=config["dtype"])
    editor = build_editor(config, host, backbone)
    words = _nouns(host, args.source, args.words)
    alignment = align_prompts(editor.tokenizer, args.source, args.target, int(backbone.max_tokens))
    edit_words = list(args.edit_words) if args.edit_words else edited_nouns(alignment, words)
    if not words or not edit_words:
        raise InputError(f"no edited object found (nouns {words}, changed source words "
                         f"{[alignment.source_words[i] for i in alignment.changed]})", where="t2ialign edit",
                         fix="name the source's objects with --words and the edited one(s) with --edit-words")
    missing = [w for w in edit_words if w not in words]
    words += missing
    if len(words) == 1:
        print(f"note: {words[0]!r} is the only object word: ELBO calibration has nothing to change (its score "
              f"S is 1), so the baseline and calibrated masks are the same; name the caption's other objects "
              f"with --words to compare them", file=sys.stderr)
    tic = time.perf_counter()
    source = editor.source_from_image(image, args.source)
    masks = editor.masks(source, words, edit_words, variants, key=Path(args.image).name)
    clip = None
    if config["clip_metric"]:
        try:
            clip = host.metric(config["clip_metric"])
        except T2IAlignError as exc:
            print(f"warning: no CLIP score ({exc.what}); set clip_metric=... to a loadable metric",
                  file=sys.stderr)
    stem = Path(args.image).stem
    summary: dict[str, Any] = {"image": str(args.image), "source": args.source, "target": args.target,
                               "words": words, "edit_words": edit_words, "backbone": config["backbone"],
                               "variants": {}}
    tiles: list[tuple[str, Any]] = [("source", source.image)]
    for v in variants:
        res = editor.edit(source, args.target, masks[v.name])
        m = masks[v.name]
        # outside the mask: the decoded latent blend against the source (with blend.paste the
        # saved edit holds the source's own pixels there)
        row = {"mask_fraction": float(m.latent.float().mean()), "scores": dict(zip(words, m.scores)),
               **background_scores(source.image, res.decoded, m.image_mask), "pasted": editor.paste}
        if clip is not None:
            row["clip_score"] = float(clip.score([res.image], [args.target])[0])
        summary["variants"][v.name] = row
        save_png(out / f"{stem}_edit_{v.name}.png", res.image)
        save_png(out / f"{stem}_mask_{v.name}.png", (m.image_mask * 255).astype(np.uint8))
        j = words.index(edit_words[0])
        tiles += [(f"{v.name} heat", overlay(source.image, m.heat[j].numpy())),
                  (f"{v.name} mask", label_to_rgb(m.image_mask.astype(np.int64))), (f"{v.name} edit", res.image)]
    summary["seconds"] = round(time.perf_counter() - tic, 3)
    save_png(out / f"{stem}_edit_panel.png", panel(tiles, scale=3 if source.image.shape[0] <= 128 else 1))
    atomic_write_json(out / f"{stem}_edit.json", summary)
    atomic_write_text(out / "config.yaml", dump_config(config))
    print(to_json({k: summary[k] for k in ("edit_words", "variants", "seconds")}))
    print(f"wrote {out / (stem + '_edit_panel.png')} and the edits to {out}")
    return 0


@hookimpl
def t2ialign_add_commands(subparsers: Any) -> None:
    from t2ialign.core.cli import add_run_options, add_word_list, number_in

    e = subparsers.add_parser("edit", help="edit one image from a source to a target caption (Prompt-to-Prompt "
                                           "with uncalibrated vs ELBO-calibrated local blend)",
                              epilog="key=value overrides may follow the word lists: --words circle star steps=20 "
                                     "(a word never contains '=')")
    e.add_argument("image", help="image file (any Pillow format; converted to RGB)")
    e.add_argument("--source", required=True, help="caption of the image, e.g. 'a photo of a red circle'")
    e.add_argument("--target", required=True, help="the edited caption, e.g. 'a photo of a blue circle'")
    add_word_list(e, "--words", metavar="WORD",
                  help="the objects of the source caption (default: noun-phrase heads)")
    add_word_list(e, "--edit-words", metavar="WORD",
                  help="the object(s) of the source caption the edit changes (default: from the word diff)")
    e.add_argument("--backbone", help="registry backbone name (default toy)")
    e.add_argument("--gamma", type=number_in(0, 1, low_open=True, high_open=True, example="--gamma 1/3"),
                   help="calibration strength of the calibrated blend, in (0, 1) (1/3 is allowed)")
    e.add_argument("--device", help="torch device")
    add_run_options(e)
    e.set_defaults(handler=cmd_edit)
