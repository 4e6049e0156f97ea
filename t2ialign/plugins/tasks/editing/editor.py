"""The editor: source trajectories, local-blend masks and the Prompt-to-Prompt edit itself.

:class:`Editor` samples source and target captions as one batch from the source's first latent,
with the attention controller a backbone's extractor plugin builds (hook
``t2ialign_make_attention_editor``) and the blend mask from the source's heatmaps (package
docstring, steps 1-3). Which backbones can be edited is the plugins' answer, not this module's:
:func:`check_editable` turns "no plugin answers" into an error that says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from t2ialign.core.errors import ConfigError, InputError, PluginError
from t2ialign.core.inversion import ddim_invert, null_text_invert
from t2ialign.core.pipeline import AlignmentPipeline, Variant
from t2ialign.core.protocols import AttentionEditControl
from t2ialign.core.sampling import ddim_timesteps, initial_noise, latent_shape_of, sample
from t2ialign.core.thresholds import labels_from_heatmaps
from t2ialign.plugins.tasks.editing.alignment import ALIGNMENT_MODES, PromptAlignment, align_prompts, word_columns

#: what ``t2ialign_make_attention_editor`` answers: builds one edit's controller from its schedule
ControllerFactory = Callable[..., AttentionEditControl]


def check_editable(backbone: Any, attention: ControllerFactory | None) -> None:
    """Refuse, before any work, a backbone whose attention no plugin can control.

    ``attention``: what ``t2ialign_make_attention_editor`` answered for ``backbone``
    (:meth:`~t2ialign.core.host.Host.attention_editor`); ``None`` when no plugin edits its
    attention -- then this raises, naming why for the attention kinds whose reason is known.

    Prompt-to-Prompt needs, per layer, the image queries' probabilities over the text tokens in
    a separate cross-attention, and one token axis that the word-by-word alignment indexes. An
    MM-DiT (SD3 / SD3.5) has neither: text and image tokens attend jointly in one softmax, so
    "replacing the cross-attention" would mean rewriting a slice of a distribution normalised
    over image *and* text keys (and the text rows attending back to the image), and its text
    axis concatenates CLIP and T5 tokenisations. That editor is not implemented; saying so
    is better than an edit that silently does something else.
    """
    if attention is not None:
        return
    kind = getattr(backbone, "attention_kind", None)
    why = (" (joint MM-DiT attention: image and text tokens share one softmax, so there is no separate "
           "cross-attention map to replace, and its text axis joins the CLIP and T5 tokens)" if kind == "mmdit" else
           " (no plugin answers t2ialign_make_attention_editor for it)" if kind == "unet" else "")
    raise PluginError(
        f"attention editing is not supported on backbone '{getattr(backbone, 'name', '?')}', whose attention is "
        f"'{kind}'{why}", where="editing",
        fix="edit with a UNet backbone: SD 1.x / 2.x, SDXL or the toy model; SD3 heatmaps and segmentation work")

@dataclass
class SourceTrajectory:
    """The source of an edit: its image (at the backbone's size), caption and latent per step."""

    image: np.ndarray
    prompt: str
    latents: torch.Tensor  # (steps + 1, C, h, w), sampling order; latents[-1] = the clean end point
    timesteps: list[int]
    mode: str  # "real" or "generated"
    #: null-text inversion: the optimised unconditional embedding of every step (None: the empty prompt's)
    uncond: list[Any] | None = None


@dataclass
class BlendMask:
    """Where an edit may act. ``labels``: argmax/threshold label map of the heatmaps (1..C);
    ``region``: pixels labelled as an edited noun; ``latent``: that region on the latent grid,
    dilated; ``image_mask``: the latent mask at image resolution (what can actually change)."""

    variant: str
    heat: torch.Tensor
    labels: np.ndarray
    region: np.ndarray
    latent: torch.Tensor
    image_mask: np.ndarray
    scores: list[float] = field(default_factory=list)


@dataclass
class EditOutput:
    """One edit: the edited image, the source's own decode, final latents and the mask used.

    ``image`` is what the user gets: with ``blend.paste`` the source image outside the mask and
    the decoded edit inside; without it, the decoded edit (``decoded``) everywhere."""

    image: np.ndarray
    source_decoded: np.ndarray
    latents: torch.Tensor  # (2, C, h, w): [source end point, edited]
    mask: BlendMask | None
    alignment: PromptAlignment
    controller: AttentionEditControl
    decoded: np.ndarray | None = None  # the decoded edit before any paste (= image when nothing was pasted)


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """Square bilinear resize (what the backbones feed their VAE), a no-op at the right size."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape[0] == size and mask.shape[1] == size:
        return mask
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="nearest")[0, 0].numpy() > 0.5


def blend_mask(heat: torch.Tensor, words: Sequence[str], edit_words: Sequence[str], *, threshold: float,
               dilate: int, latent_hw: tuple[int, int], variant: str = "") -> BlendMask:
    """Local-blend mask from per-class heatmaps ``(C, H, W)`` of ``words`` (package docstring, step 3)."""
    unknown = [w for w in edit_words if w not in words]
    if unknown:
        raise InputError(f"edited words {unknown} are not among the heatmap words {list(words)}",
                         where="local blend", fix="the edited nouns must be listed in the source's words")
    if dilate < 0:
        raise ConfigError(f"blend.dilate must be >= 0 latent cells, got {dilate}", where="config key blend.dilate")
    ids = list(range(1, len(words) + 1))
    labels = labels_from_heatmaps(heat, ids, threshold).numpy()
    edit_ids = [ids[words.index(w)] for w in edit_words]
    return mask_from_region(np.isin(labels, edit_ids), dilate=dilate, latent_hw=latent_hw, variant=variant,
                            heat=heat, labels=labels)


def mask_from_region(region: np.ndarray, *, dilate: int, latent_hw: tuple[int, int], variant: str = "",
                     heat: torch.Tensor | None = None, labels: np.ndarray | None = None) -> BlendMask:
    """The blend mask of a pixel ``region`` (bool, image size): max-pooled to the latent grid,
    dilated by ``dilate`` cells, and that latent mask at image resolution. ``blend_mask`` passes
    the region its heatmaps label; ``benchmarks/edit_capacity.py`` a true object mask."""
    grid = torch.from_numpy(region.astype(np.float32))[None, None]
    # a latent cell is editable when any of its pixels is: never cut an object's rim
    latent = F.adaptive_max_pool2d(grid, latent_hw)
    if dilate:
        latent = F.max_pool2d(latent, kernel_size=2 * dilate + 1, stride=1, padding=dilate)
    image_mask = F.interpolate(latent, size=region.shape, mode="nearest")[0, 0].numpy() > 0.5
    return BlendMask(variant, heat if heat is not None else torch.zeros(1),
                     labels if labels is not None else np.zeros(1), region, latent[0, 0] > 0.5, image_mask)


def paste_outside(source: np.ndarray, edited: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``edited`` inside ``region`` (bool, image size) and ``source`` everywhere else, exactly.

    The latent blend keeps the *latents* outside the mask, but the decoder mixes latents and
    reconstructs even an untouched image only approximately (the toy VAE at ~24 dB), so the
    unedited pixels are repainted by the VAE. Pasting the source's own pixels back is what
    diffusers' inpainting pipelines do (``VaeImageProcessor.apply_overlay``, used here) and what
    Blended Latent Diffusion calls background reconstruction; the price is a visible seam where
    the decoder's colours differ from the source's.
    """
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    if source.shape != edited.shape or region.shape != edited.shape[:2]:
        raise InputError(f"shapes differ: source {source.shape}, edit {edited.shape}, region {region.shape}",
                         where="paste_outside", fix="resize the source to the backbone's image size first")
    keep_edit = Image.fromarray(region.astype(np.uint8) * 255, mode="L")
    out = VaeImageProcessor().apply_overlay(keep_edit, Image.fromarray(source), Image.fromarray(edited))
    return np.asarray(out)


def _word_numbers(values: Any, key: str, example: str) -> dict[str, float]:
    """A ``{word: number}`` option checked for shape (its values are range-checked where used)."""
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
        raise ConfigError(f"{key} must map target words to numbers, got {values!r}", where=f"config key {key}",
                          fix=f"write e.g. {example}")
    return {str(k): float(v) for k, v in values.items()}


class Editor:
    """Prompt-to-Prompt editing with a heatmap local blend on one backbone (package docstring).

    ``attention``: the backbone's controller factory, what ``t2ialign_make_attention_editor``
    answers (:meth:`~t2ialign.core.host.Host.attention_editor`); ``None`` is refused by
    :func:`check_editable`.
    """

    def __init__(self, backbone: Any, pipeline: AlignmentPipeline | None, *, attention: ControllerFactory | None,
                 steps: int = 50, guidance: float = 5.0,
                 inversion_guidance: float = 1.0, cross_replace_steps: float = 0.8, self_replace_steps: float = 0.4,
                 self_replace_max_tokens: int | None = 1024, threshold: float = 0.3, dilate: int = 1,
                 paste: bool = True, mask_noise: float = 0.0, noise_seed: int = 0, inversion: str = "ddim", null_text: dict[str, Any] | None = None, progress: bool = False,
                 alignment: str = "auto", reweight: dict[str, float] | None = None,
                 word_replace_steps: dict[str, float] | None = None) -> None:
        if alignment not in ALIGNMENT_MODES:
            raise ConfigError(f"alignment must be one of {list(ALIGNMENT_MODES)}, got {alignment!r}",
                              where="config key alignment",
                              fix="replace = word swap, refine = added words, auto = whichever fits each word")
        check_editable(backbone, attention)
        self.attention = attention
        self.alignment = alignment
        self.reweight = _word_numbers(reweight, "reweight", "reweight={blue: 2.0}")
        self.word_replace_steps = _word_numbers(word_replace_steps, "word_replace_steps",
                                                "word_replace_steps={blue: 0.3}")
        if inversion not in ("ddim", "null_text"):
            raise ConfigError(f"inversion must be 'ddim' or 'null_text', got {inversion!r}", where="config key inversion",
                              fix="ddim = plain DDIM inversion (fast; drifts under guidance), null_text = Null-text "
                                  "inversion (optimises the unconditional embedding so guided sampling reconstructs)")
        self.inversion = inversion
        self.null_text = dict(null_text or {})
        self.progress = bool(progress)
        self.backbone = backbone
        self.pipeline = pipeline
        self.steps = int(steps)
        self.timesteps = ddim_timesteps(backbone, self.steps)
        self.guidance = float(guidance)
        self.inversion_guidance = float(inversion_guidance)
        self.cross_replace_steps = float(cross_replace_steps)
        self.self_replace_steps = float(self_replace_steps)
        self.self_replace_max_tokens = self_replace_max_tokens
        self.threshold = float(threshold)
        self.dilate = int(dilate)
        self.paste = bool(paste)
        if not 0.0 <= float(mask_noise) <= 1.0:
            raise ConfigError(f"blend.mask_noise must lie in [0, 1], got {mask_noise}", where="config key blend.mask_noise",
                              fix="0 = start the edit from the inverted latent (Prompt-to-Prompt), 1 = from fresh "
                                  "noise inside the mask (Blended Latent Diffusion)")
        self.mask_noise = float(mask_noise)
        self.noise_seed = int(noise_seed)
        tokenizer = getattr(backbone, "tokenizer", None)
        if tokenizer is None:
            raise PluginError(f"backbone '{backbone.name}' exposes no tokenizer", where="editing",
                              fix="prompt alignment needs backbone.tokenizer (SD-family plugins have it)")
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ sources
    def source_from_image(self, image: np.ndarray, prompt: str) -> SourceTrajectory:
        """Invert a real image under its caption: plain DDIM, or Null-text inversion for the
        editor's guidance (then sampling the caption with the stored embeddings reconstructs it)."""
        image = resize_rgb(np.asarray(image, dtype=np.uint8), int(self.backbone.image_size))
        if self.inversion == "null_text" and self.guidance != 1.0:
            inv = null_text_invert(self.backbone, image, prompt, steps=self.steps, guidance=self.guidance,
                                   progress=self.progress, **self.null_text)
        else:
            with torch.no_grad():
                inv = ddim_invert(self.backbone, image, prompt, steps=self.steps, guidance=self.inversion_guidance)
        return SourceTrajectory(image, prompt, inv.latents, inv.timesteps, "real", uncond=inv.uncond)

    @torch.no_grad()
    def source_from_prompt(self, prompt: str, seed: int) -> SourceTrajectory:
        """Sample the source caption (seeded) and keep its latent after every step."""
        noise = initial_noise(latent_shape_of(self.backbone, 1), seed).to(self.backbone.device)
        path: list[torch.Tensor] = [noise]

        def keep(step: int, t: int, z: torch.Tensor) -> None:
            path.append(z.detach().clone())

        image, _ = sample(self.backbone, prompt, steps=self.steps, guidance=self.guidance, seed=seed,
                          latents=noise, step_callback=keep)
        return SourceTrajectory(image, prompt, torch.cat(path), list(self.timesteps), "generated")

    # ------------------------------------------------------------------ masks
    def masks(self, source: SourceTrajectory, words: Sequence[str], edit_words: Sequence[str],
              variants: Sequence[Variant], key: str = "image",
              thresholds: dict[str, float] | None = None) -> dict[str, BlendMask]:
        """Blend masks of the edited nouns, one per heatmap variant, from one pipeline run.

        ``thresholds``: the background threshold of each variant (e.g. tuned on held-out scenes:
        calibration changes the maps' value distribution); variants not in it use ``threshold``."""
        if self.pipeline is None:
            raise ConfigError("a local blend needs an AlignmentPipeline", where="Editor",
                              fix="build the Editor with the pipeline, or edit without mask")
        res = self.pipeline.run(source.image, list(words), variants, key=key)
        hw = tuple(int(s) for s in source.latents.shape[-2:])
        out = {}
        for v in variants:
            m = blend_mask(res.heatmaps[v.name], res.words, list(edit_words),
                           threshold=(thresholds or {}).get(v.name, self.threshold),
                           dilate=self.dilate, latent_hw=hw, variant=v.name)  # type: ignore[arg-type]
            m.scores = [float(s) for s in res.scores[v.name]]
            out[v.name] = m
        return out

    # ------------------------------------------------------------------ the edit
    def _start(self, first: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The starting latents ``(1 or 2, C, h, w)``: the source's first latent for both rows, or,
        with ``mask_noise = lam > 0``, the target row's masked cells mixed with fresh noise,
        ``sqrt(1 - lam^2) z + lam eps`` (variance kept), so the edit is not pinned to the colours
        the inverted latent still carries."""
        if keep is None or self.mask_noise == 0.0:
            return first
        eps = initial_noise(tuple(first.shape), self.noise_seed).to(first.device)
        mixed = math.sqrt(1.0 - self.mask_noise ** 2) * first + self.mask_noise * eps
        return torch.cat([first, torch.where(keep, mixed, first)])

    @torch.no_grad()
    def edit(self, source: SourceTrajectory, target: str, mask: BlendMask | None = None, *,
             record: bool = False) -> EditOutput:
        """Sample ``target`` next to the anchored source with attention replacement and local blend."""
        if list(source.timesteps) != list(self.timesteps):
            raise InputError("the source trajectory was made with another schedule", where="Editor.edit",
                             fix="build the source with this Editor (same steps)")
        bb = self.backbone
        alignment = align_prompts(self.tokenizer, source.prompt, target, int(bb.max_tokens), mode=self.alignment)
        guided = self.guidance != 1.0
        # sample() batches [uncond rows, cond rows] when guided, cond rows only otherwise;
        # P2P edits the conditional branch: rows (source, target) of the cond block
        pairs = [(2, 3)] if guided else [(0, 1)]
        controller = self.attention(
            steps=self.steps, cross_replace_steps=self.cross_replace_steps,
            self_replace_steps=self.self_replace_steps, token_map=alignment.mapping, pairs=pairs,
            batch=4 if guided else 2, self_replace_max_tokens=self.self_replace_max_tokens, record=record,
            column_replace_steps=word_columns(alignment, self.word_replace_steps, "word_replace_steps"),
            reweight=word_columns(alignment, self.reweight, "reweight"))
        traj = source.latents.to(bb.device, torch.float32)
        keep = None if mask is None else mask.latent.to(bb.device)[None, None]

        def anchor_and_blend(step: int, t: int, z: torch.Tensor) -> torch.Tensor:
            controller.step = step + 1
            nxt = traj[step + 1 : step + 2]
            edited = z[1:2] if keep is None else torch.where(keep, z[1:2], nxt)
            return torch.cat([nxt, edited])

        # a null-text source: both rows use its per-step unconditional embeddings (as in the paper)
        per_step = source.uncond
        uncond_fn = None if per_step is None or not guided else (lambda step, t, z: per_step[step])
        controller.step = 0
        with controller.installed(bb):
            images, z = sample(bb, [source.prompt, target], steps=self.steps, guidance=self.guidance, seed=0,
                               latents=self._start(traj[:1], keep), step_callback=anchor_and_blend,
                               uncond_fn=uncond_fn)
        decoded = edited = images[1]
        if self.paste and mask is not None:
            edited = paste_outside(resize_rgb(source.image, decoded.shape[0]), decoded, mask.image_mask)
        return EditOutput(edited, images[0], z, mask, alignment, controller, decoded=decoded)

