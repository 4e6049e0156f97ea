"""Text-guided editing: Prompt-to-Prompt attention control with an ELBO-calibrated local blend.

Method (method-spec §10; Prompt-to-Prompt, Hertz et al. 2022, re-implemented here):

1. **Source trajectory.** A real image is DDIM-inverted under its source caption
   (:mod:`t2ialign.core.inversion`); for a generated source the caption is sampled first and its
   latents are recorded. Either way we hold the latent ``z_k`` of the source at every step ``k``.
2. **Attention control.** Source and target prompts are sampled as one batch from ``z_0`` with
   our own attention processors (installed with diffusers' ``Attention.set_processor`` by
   :class:`AttentionEditController`, removed on exit, also on errors -- no ``forward`` is
   patched). For the first ``cross_replace_steps`` fraction of the steps the target row's
   cross-attention probabilities on *aligned* tokens are overwritten by the source row's; for
   the first ``self_replace_steps`` fraction the target's self-attention probabilities are the
   source's (only in layers with at most ``self_replace_max_tokens`` query tokens, as
   Prompt-to-Prompt does, because the full-resolution maps are huge and carry little layout).
   Token alignment (:func:`align_prompts`) works on whitespace-separated words:
   ``difflib`` matches the two word lists; equal words map token by token, a replaced run of
   words with the same number of tokens maps position by position (the word swap: "red" ->
   "blue" inherits where "red" was attended), anything else (insertions, deletions, replaced
   runs of another length) stays the target's own attention. BOS maps to BOS and the
   end-of-text/padding tokens map in order. Probabilities are not renormalised after the swap
   (Prompt-to-Prompt does not either).
3. **Local blend.** The edit is confined to a mask: per-class heatmaps of the source image's
   nouns from :class:`~t2ialign.core.pipeline.AlignmentPipeline` (joint prompt "a photo of
   circle, star"), argmax + threshold as in segmentation, the classes of the edited words
   selected, max-pooled to the latent grid and dilated by ``blend.dilate`` latent cells. After
   every step the target latent outside the mask is *replaced* by the source trajectory's
   latent (``torch.where``), so the unmasked latents end exactly at the source's.
   **Variants**: ``baseline`` masks come from uncalibrated heatmaps (gamma = 1), ``calibrated``
   from ELBO-calibrated ones (gamma) -- the comparison this task measures.

Differences to Prompt-to-Prompt: the source branch is *anchored* to the source trajectory (its
latent is reset to ``z_k`` each step, so its attention is always that of the true source, and a
real image needs no null-text optimisation for the unedited region); the blend mask comes from
ELBO-calibrated heatmaps of the source image, computed once, instead of from the running
cross-attention of the edited words; only the conditional rows are edited (as in P2P).

The task (``t2ialign eval editing``) builds edit pairs from toy scenes: a caption with one
object's colour or shape swapped, and scores both variants: CLIP score of the edit to the
target prompt, background PSNR/SSIM outside the edited object's ground-truth region, IoU of
the blend mask with that object, and the toy oracle (edited object changed, others kept).
"""

from __future__ import annotations

import difflib
import io
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from t2ialign.core.config import dump_config
from t2ialign.core.errors import ConfigError, InputError, PluginError
from t2ialign.core.fileio import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
)
from t2ialign.core.hookspecs import hookimpl
from t2ialign.core.inversion import ddim_invert, null_text_invert
from t2ialign.core.pipeline import AlignmentPipeline, Variant, pipeline_from_config
from t2ialign.core.sampling import ddim_timesteps, initial_noise, latent_shape_of, sample
from t2ialign.core.specs import EntrySpec, PluginInfo
from t2ialign.core.thresholds import labels_from_heatmaps
from t2ialign.plugins.extractors.unet import DelegatingProcessor, attention_inputs
from t2ialign.plugins.tasks.common import Procs, check_number, check_weights, claimed_output, record_weights, safe_name, versions

if TYPE_CHECKING:
    from t2ialign.core.host import Host
    from t2ialign.core.protocols import Backbone, Metric

DEFAULTS: dict[str, Any] = {
    "backbone": "toy",
    "dataset": "toy_shapes",
    "split": "test",
    "limit": 32,
    "min_objects": 2,
    "edit_kinds": ["colour", "shape"],
    "source": "real",
    "device": "cpu",
    "dtype": "float32",
    "seed": 4307,
    "output": "runs/editing",
    "steps": 50,
    "guidance": 5.0,
    "inversion_guidance": 1.0,
    "inversion": "ddim",
    "null_text": {"inner_steps": 10, "lr": 0.01, "tolerance": 1e-5},
    "alignment": "auto",
    "cross_replace_steps": 0.8,
    "word_replace_steps": {},
    "self_replace_steps": 0.4,
    "self_replace_max_tokens": 1024,
    "reweight": {},
    "gamma": 1.0 / 3.0,
    "blend": {"threshold": 0.4, "dilate": 1},
    # elbo.preset: null = the keys as given; "fast" / "reference" expand into scheme, timesteps and
    # antithetic when the config is resolved (core/elbo_presets.py)
    "elbo": {"prompt": "a photo of {cls}", "timesteps": [[1, 999, 50]], "scheme": "uniform", "batch_size": 8,
             "antithetic": False, "preset": None},
    "collect": {"prompt": "a photo of {classes}", "timesteps": [[20, 201, 20]], "batch_size": 10},
    "layers": {"cross_weight": None, "cross_gaussian_sigma": None, "self_weight": None},
    "prefactor_exponent": None,
    "clip_metric": "clip_score_toy",
    "oracle_metric": "toy_oracle",
    "bootstrap": 1000,
    "visuals": 12,
}

#: config keys whose change invalidates stored edits (a resumed run must match them)
RESULT_KEYS = ("backbone", "dataset", "split", "min_objects", "edit_kinds", "source", "dtype", "seed", "steps",
               "guidance", "inversion_guidance", "inversion", "null_text", "alignment", "cross_replace_steps",
               "word_replace_steps", "self_replace_steps", "self_replace_max_tokens", "reweight", "gamma", "blend",
               "elbo", "collect", "layers", "prefactor_exponent")

#: per-item numbers compared between the variants (higher is better for all of them)
PAIRED_METRICS = ("clip_score", "bg_psnr", "bg_ssim", "mask_iou", "oracle_edited", "oracle_others", "oracle_full",
                  "colour_edited", "colour_others")


# --------------------------------------------------------------------------------------------
# token alignment between source and target prompts
# --------------------------------------------------------------------------------------------
@dataclass
class PromptAlignment:
    """Word and token correspondence of a source and a target prompt.

    ``mapping[j]``: source token position whose attention target position ``j`` takes, ``-1``
    where the target keeps its own (length = the backbone's text axis, BOS at 0).
    ``changed``: source word indices that differ in the target (for a pure insertion: the index
    of the source word the insertion precedes).
    """

    source_words: list[str]
    target_words: list[str]
    source_spans: list[list[int]]
    target_spans: list[list[int]]
    mapping: torch.Tensor
    changed: list[int]

    @property
    def aligned(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(target_positions, source_positions)`` of every aligned token."""
        tgt = torch.nonzero(self.mapping >= 0).flatten()
        return tgt, self.mapping[tgt]


def _word_spans(tokenizer: Any, prompt: str, max_tokens: int, where: str) -> tuple[list[str], list[list[int]]]:
    words = prompt.split()
    if not words:
        raise InputError("the prompt is empty", where=where, fix="give a caption such as 'a red circle'")
    spans, pos, joined = [], 1, []
    for w in words:
        ids = list(tokenizer(w, add_special_tokens=False)["input_ids"])
        spans.append(list(range(pos, pos + len(ids))))
        joined += ids
        pos += len(ids)
    full = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if full != joined:  # only a tokenizer that merges across spaces could do this
        raise InputError(f"the tokenizer does not split '{prompt}' at spaces", where=where,
                         fix="editing aligns prompts word by word; use a CLIP-BPE backbone")
    if pos >= max_tokens:  # BOS + words + EOS must fit
        raise InputError(f"the prompt needs {pos + 1} tokens, more than the {max_tokens} the model reads",
                         where=where, fix="shorten the prompt")
    return words, spans


#: how replaced words are aligned (Prompt-to-Prompt's edit kinds)
ALIGNMENT_MODES = ("auto", "replace", "refine")


def align_prompts(tokenizer: Any, source: str, target: str, max_tokens: int = 77,
                  mode: str = "auto") -> PromptAlignment:
    """Token alignment of ``target`` to ``source`` (rules in the module docstring).

    ``mode``: ``auto`` maps unchanged words and replaced runs of the same token count, lets
    insertions keep their own attention; ``replace`` (the word swap) is ``auto`` but refuses an
    edit that is not one -- a replaced run of another token count, an insertion or a deletion --
    instead of quietly treating it otherwise; ``refine`` maps unchanged words only, so every new
    or replaced word keeps its own attention (adding detail: "a circle" -> "a striped circle").
    """
    if mode not in ALIGNMENT_MODES:
        raise ConfigError(f"alignment must be one of {list(ALIGNMENT_MODES)}, got {mode!r}",
                          where="config key alignment",
                          fix="replace = word swap, refine = added words, auto = whichever fits each word")
    s_words, s_spans = _word_spans(tokenizer, source, max_tokens, "source prompt")
    t_words, t_spans = _word_spans(tokenizer, target, max_tokens, "target prompt")
    mapping = torch.full((max_tokens,), -1, dtype=torch.long)
    mapping[0] = 0
    changed: list[int] = []
    matcher = difflib.SequenceMatcher(a=[w.lower() for w in s_words], b=[w.lower() for w in t_words], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        s_tok = [p for k in range(i1, i2) for p in s_spans[k]]
        t_tok = [p for k in range(j1, j2) for p in t_spans[k]]
        swap = tag == "replace" and len(s_tok) == len(t_tok)
        if mode == "replace" and tag != "equal" and not swap:
            raise InputError(
                f"'{' '.join(s_words[i1:i2]) or '(nothing)'}' -> '{' '.join(t_words[j1:j2]) or '(nothing)'}' is not "
                f"a word swap of equal token length", where="alignment=replace",
                fix="use alignment=refine (or auto) for added, removed or differently long words")
        if tag == "equal" or (swap and mode != "refine"):
            for a, b in zip(t_tok, s_tok):
                mapping[a] = b
        if tag != "equal":
            changed.extend(range(i1, i2) if i2 > i1 else [min(i1, len(s_words) - 1)])
    end_s = s_spans[-1][-1] + 1
    end_t = t_spans[-1][-1] + 1
    for k in range(max_tokens - end_t):  # EOS and padding, in order
        if end_s + k < max_tokens:
            mapping[end_t + k] = end_s + k
    return PromptAlignment(s_words, t_words, s_spans, t_spans, mapping, sorted(set(changed)))


def _bare(word: str) -> str:
    return "".join(c for c in word.lower() if c.isalnum() or c == "-")


def edited_nouns(alignment: PromptAlignment, nouns: Sequence[str]) -> list[str]:
    """The nouns of ``nouns`` whose object the edit touches.

    A changed word that is itself a noun is edited; a changed attribute belongs to the first noun
    after it (English puts adjectives before their noun: "a *red* circle"), or to the last noun
    before it when none follows.
    """
    position: dict[int, str] = {}
    for noun in nouns:
        last = _bare(noun.split()[-1])
        for i, w in enumerate(alignment.source_words):
            if _bare(w) == last and i not in position:
                position[i] = noun
                break
    if not position:
        return []
    out: list[str] = []
    for c in alignment.changed:
        after = [i for i in sorted(position) if i >= c]
        before = [i for i in sorted(position) if i < c]
        pick = after[0] if after else before[-1]
        if position[pick] not in out:
            out.append(position[pick])
    return out


# --------------------------------------------------------------------------------------------
# attention control
# --------------------------------------------------------------------------------------------
def _explicit_attention(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                        attention_mask: torch.Tensor | None, temb: torch.Tensor | None, edit) -> torch.Tensor:
    """One diffusers ``Attention`` call with materialised probabilities that ``edit`` may change.

    The same input/output transformations a standard processor applies (spatial norm, 4-D
    feature maps, group norm, cross-norm, per-head q/k norms, output projection, residual,
    rescale), with ``softmax(Q K^T * scale)`` computed in float32 and handed to
    ``edit(probs (B, heads, Q, K)) -> probs`` before it weights the values.
    """
    residual = hidden_states
    x, context, shape4d = attention_inputs(attn, hidden_states, encoder_hidden_states, temb)
    query, key, value = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    batch, heads = query.shape[0], attn.heads
    head_dim = key.shape[-1] // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    query, key, value = split(query), split(key), split(value)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scale
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
        scores = scores + mask.view(batch, heads, -1, mask.shape[-1]).float()
    probs = edit(torch.softmax(scores, dim=-1))
    out = (probs.to(value.dtype) @ value).transpose(1, 2).reshape(batch, -1, heads * head_dim)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if shape4d is not None:
        out = out.transpose(-1, -2).reshape(shape4d)
    if getattr(attn, "residual_connection", False):
        out = out + residual
    return out / getattr(attn, "rescale_output_factor", 1.0)


class EditProcessor(DelegatingProcessor):
    """Attention processor of one layer: explicit, edited attention while the controller asks for
    it, the layer's original processor otherwise (so untouched steps are bit-identical)."""

    def __init__(self, inner: Any, controller: "AttentionEditController", kind: str, name: str) -> None:
        super().__init__(inner)
        self.controller = controller
        self.kind = kind
        self.name = name

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        queries = hidden_states.shape[-1] * hidden_states.shape[-2] if hidden_states.ndim == 4 else hidden_states.shape[1]
        if self.controller.wants(self.kind, int(queries)):
            return _explicit_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                       lambda p: self.controller.edit(self.kind, self.name, p))
        return self.delegate(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)


def check_editable(backbone: Any) -> None:
    """Refuse, before any work, a backbone whose attention this editor cannot control.

    Prompt-to-Prompt needs, per layer, the image queries' probabilities over the text tokens in
    a separate cross-attention, and one token axis that the word-by-word alignment indexes. An
    MM-DiT (SD3 / SD3.5) has neither: text and image tokens attend jointly in one softmax, so
    "replacing the cross-attention" would mean rewriting a slice of a distribution normalised
    over image *and* text keys (and the text rows attending back to the image), and its text
    axis concatenates CLIP and T5 tokenisations. That editor is not implemented; saying so
    is better than an edit that silently does something else.
    """
    kind = getattr(backbone, "attention_kind", None)
    if kind == "unet":
        return
    why = (" (joint MM-DiT attention: image and text tokens share one softmax, so there is no separate "
           "cross-attention map to replace, and its text axis joins the CLIP and T5 tokens)" if kind == "mmdit" else "")
    raise PluginError(
        f"attention editing is not supported on backbone '{getattr(backbone, 'name', '?')}', whose attention is "
        f"'{kind}'{why}", where="editing",
        fix="edit with a UNet backbone: SD 1.x / 2.x, SDXL or the toy model; SD3 heatmaps and segmentation work")


class AttentionEditController:
    """Prompt-to-Prompt attention replacement for (source row, target row) pairs of a batch.

    ``steps``: sampling steps; the edit is active while ``step < int(fraction * steps)``, with
    ``step`` set by the caller before each denoiser call (no layer counting). ``token_map``:
    :attr:`PromptAlignment.mapping`. ``pairs``: ``(source_row, target_row)`` in the denoiser
    batch; ``batch``: the batch size the pairs refer to (a call with another batch size is an
    error, never a silent mis-edit). ``record``: keep every edited call's probabilities before
    and after the edit in :attr:`records` (tests, debugging; memory grows per call).
    ``column_replace_steps``: per target token position, its own cross-replace fraction
    (Prompt-to-Prompt's per-word schedules; positions not in it use ``cross_replace_steps``).
    ``reweight``: per target token position, a factor on the target row's cross-attention
    probabilities at every step (Prompt-to-Prompt's reweighting; factor 1 changes nothing).
    """

    def __init__(self, *, steps: int, cross_replace_steps: float, self_replace_steps: float,
                 token_map: torch.Tensor, pairs: Sequence[tuple[int, int]], batch: int,
                 self_replace_max_tokens: int | None = 1024, record: bool = False,
                 column_replace_steps: dict[int, float] | None = None,
                 reweight: dict[int, float] | None = None) -> None:
        fractions = [("cross_replace_steps", cross_replace_steps), ("self_replace_steps", self_replace_steps)]
        fractions += [(f"word_replace_steps (token {c})", f) for c, f in (column_replace_steps or {}).items()]
        for key, frac in fractions:
            if not 0.0 <= float(frac) <= 1.0:
                raise ConfigError(f"{key} must be a fraction of the steps in [0, 1], got {frac}",
                                  where=f"config key {key.split(' ')[0]}", fix=f"use e.g. {key.split(' ')[0]}=0.4")
        for col, factor in (reweight or {}).items():
            if not (math.isfinite(float(factor)) and float(factor) >= 0):
                raise ConfigError(f"reweight factor {factor!r} (token {col}) must be finite and >= 0",
                                  where="config key reweight", fix="use e.g. reweight={blue: 2.0}")
        self.steps = int(steps)
        self.cross_until = int(float(cross_replace_steps) * self.steps)
        self.self_until = int(float(self_replace_steps) * self.steps)
        self.self_max_tokens = self_replace_max_tokens
        tgt = torch.nonzero(token_map >= 0).flatten()
        self.target_cols = tgt
        self.source_cols = token_map[tgt]
        per_col = column_replace_steps or {}
        # the step before which each aligned target column takes the source's attention
        self.column_until = torch.tensor([int(float(per_col.get(int(c), cross_replace_steps)) * self.steps)
                                          for c in tgt.tolist()], dtype=torch.long)
        self.reweight_cols = torch.tensor(sorted(int(c) for c in (reweight or {})), dtype=torch.long)
        self.reweight_factors = torch.tensor([float((reweight or {})[int(c)]) for c in self.reweight_cols.tolist()],
                                             dtype=torch.float32)
        self.pairs = [(int(s), int(t)) for s, t in pairs]
        self.batch = int(batch)
        self.record = record
        self.records: list[dict[str, Any]] = []
        self.step = 0
        self.layers = 0

    def wants(self, kind: str, queries: int) -> bool:
        if kind == "cross":
            return bool(len(self.reweight_cols)) or (
                bool(len(self.column_until)) and self.step < int(self.column_until.max()))
        if self.self_max_tokens is not None and queries > self.self_max_tokens:
            return False
        return self.step < self.self_until

    def edit(self, kind: str, name: str, probs: torch.Tensor) -> torch.Tensor:
        """Replace the target rows' probabilities ``(B, heads, Q, K)`` by the source rows' (the
        aligned columns still in their replace schedule, for cross layers), then reweight."""
        if probs.shape[0] != self.batch:
            raise PluginError(
                f"attention edit expected a batch of {self.batch} rows, layer {name} got {probs.shape[0]}",
                where="AttentionEditController",
                fix="the editor relies on the sampler's row order [uncond..., cond...]; "
                    "check t2ialign.core.sampling.sample",
            )
        before = probs.detach().clone() if self.record else None
        out = probs.clone()
        active = self.column_until > self.step
        cols_t = self.target_cols[active].to(probs.device)
        cols_s = self.source_cols[active].to(probs.device)
        for s, t in self.pairs:
            if kind == "cross":
                out[t][..., cols_t] = probs[s][..., cols_s]
                if len(self.reweight_cols):
                    cols = self.reweight_cols.to(probs.device)
                    out[t][..., cols] = out[t][..., cols] * self.reweight_factors.to(probs.device, probs.dtype)
            else:
                out[t] = probs[s]
        if self.record:
            self.records.append({"step": self.step, "kind": kind, "name": name, "before": before.cpu(),
                                 "after": out.detach().cpu()})
        return out

    @contextmanager
    def installed(self, backbone: Any) -> Iterator["AttentionEditController"]:
        """Put an :class:`EditProcessor` on every cross and self layer; restore the originals on exit."""
        check_editable(backbone)
        layers = [l for l in backbone.attention_layers() if l.kind in ("cross", "self")]
        if not any(l.kind == "cross" for l in layers):
            raise PluginError(f"backbone '{backbone.name}' reports no cross-attention layers", where="editing",
                              fix="check the backbone plugin's attention_layers()")
        modules = dict(backbone.denoiser.named_modules())
        originals: dict[str, Any] = {}
        try:
            for layer in layers:
                module = modules[layer.name]
                originals[layer.name] = module.get_processor() if hasattr(module, "get_processor") else module.processor
                module.set_processor(EditProcessor(originals[layer.name], self, layer.kind, layer.name))
            self.layers = len(originals)
            yield self
        finally:
            for name, processor in originals.items():
                modules[name].set_processor(processor)


# --------------------------------------------------------------------------------------------
# the editor
# --------------------------------------------------------------------------------------------
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
    """One edit: the edited image, the source's own decode, final latents and the mask used."""

    image: np.ndarray
    source_decoded: np.ndarray
    latents: torch.Tensor  # (2, C, h, w): [source end point, edited]
    mask: BlendMask | None
    alignment: PromptAlignment
    controller: AttentionEditController


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
    """Local-blend mask from per-class heatmaps ``(C, H, W)`` of ``words`` (module docstring, step 3)."""
    unknown = [w for w in edit_words if w not in words]
    if unknown:
        raise InputError(f"edited words {unknown} are not among the heatmap words {list(words)}",
                         where="local blend", fix="the edited nouns must be listed in the source's words")
    if dilate < 0:
        raise ConfigError(f"blend.dilate must be >= 0 latent cells, got {dilate}", where="config key blend.dilate")
    ids = list(range(1, len(words) + 1))
    labels = labels_from_heatmaps(heat, ids, threshold).numpy()
    edit_ids = [ids[words.index(w)] for w in edit_words]
    region = np.isin(labels, edit_ids)
    grid = torch.from_numpy(region.astype(np.float32))[None, None]
    # a latent cell is editable when any of its pixels is: never cut an object's rim
    latent = F.adaptive_max_pool2d(grid, latent_hw)
    if dilate:
        latent = F.max_pool2d(latent, kernel_size=2 * dilate + 1, stride=1, padding=dilate)
    image_mask = F.interpolate(latent, size=region.shape, mode="nearest")[0, 0].numpy() > 0.5
    return BlendMask(variant, heat, labels, region, latent[0, 0] > 0.5, image_mask)


def _word_numbers(values: Any, key: str, example: str) -> dict[str, float]:
    """A ``{word: number}`` option checked for shape (its values are range-checked where used)."""
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
        raise ConfigError(f"{key} must map target words to numbers, got {values!r}", where=f"config key {key}",
                          fix=f"write e.g. {example}")
    return {str(k): float(v) for k, v in values.items()}


def word_columns(alignment: PromptAlignment, values: dict[str, float], key: str) -> dict[int, float]:
    """``{target word: value}`` -> ``{target token position: value}`` for every token of each word.

    Words match the target prompt's whitespace-separated words, case and punctuation aside; a
    word the target does not contain is an error that names the target's words.
    """
    out: dict[int, float] = {}
    bare_words = [_bare(w) for w in alignment.target_words]
    for word, value in values.items():
        hits = [i for i, w in enumerate(bare_words) if w == _bare(word)]
        if not hits:
            raise InputError(f"{key} names '{word}', which is not a word of the target prompt "
                             f"'{' '.join(alignment.target_words)}'", where=f"config key {key}",
                             fix=f"use one of the target's words: {sorted(set(bare_words))}")
        for i in hits:
            for col in alignment.target_spans[i]:
                out[col] = float(value)
    return out


class Editor:
    """Prompt-to-Prompt editing with a heatmap local blend on one backbone (module docstring)."""

    def __init__(self, backbone: Any, pipeline: AlignmentPipeline | None, *, steps: int = 50, guidance: float = 5.0,
                 inversion_guidance: float = 1.0, cross_replace_steps: float = 0.8, self_replace_steps: float = 0.4,
                 self_replace_max_tokens: int | None = 1024, threshold: float = 0.4, dilate: int = 1,
                 inversion: str = "ddim", null_text: dict[str, Any] | None = None, progress: bool = False,
                 alignment: str = "auto", reweight: dict[str, float] | None = None,
                 word_replace_steps: dict[str, float] | None = None) -> None:
        if alignment not in ALIGNMENT_MODES:
            raise ConfigError(f"alignment must be one of {list(ALIGNMENT_MODES)}, got {alignment!r}",
                              where="config key alignment",
                              fix="replace = word swap, refine = added words, auto = whichever fits each word")
        check_editable(backbone)
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
              variants: Sequence[Variant], key: str = "image") -> dict[str, BlendMask]:
        """Blend masks of the edited nouns, one per heatmap variant, from one pipeline run."""
        if self.pipeline is None:
            raise ConfigError("a local blend needs an AlignmentPipeline", where="Editor",
                              fix="build the Editor with the pipeline, or edit without mask")
        res = self.pipeline.run(source.image, list(words), variants, key=key)
        hw = tuple(int(s) for s in source.latents.shape[-2:])
        out = {}
        for v in variants:
            m = blend_mask(res.heatmaps[v.name], res.words, list(edit_words), threshold=self.threshold,
                           dilate=self.dilate, latent_hw=hw, variant=v.name)  # type: ignore[arg-type]
            m.scores = [float(s) for s in res.scores[v.name]]
            out[v.name] = m
        return out

    # ------------------------------------------------------------------ the edit
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
        controller = AttentionEditController(
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
                               latents=traj[:1], step_callback=anchor_and_blend, uncond_fn=uncond_fn)
        return EditOutput(images[1], images[0], z, mask, alignment, controller)


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------
def background_scores(reference: np.ndarray, edited: np.ndarray, allowed: np.ndarray) -> dict[str, float]:
    """PSNR (dB) and mean SSIM of ``edited`` vs ``reference`` over pixels OUTSIDE ``allowed``.

    SSIM is the mean of scikit-image's full SSIM map over those pixels (each value looks at a
    7x7 window, so pixels next to the region see some of it: a slightly pessimistic score).
    """
    from skimage.metrics import structural_similarity

    if reference.shape != edited.shape or allowed.shape != reference.shape[:2]:
        raise InputError(f"shapes differ: reference {reference.shape}, edited {edited.shape}, region {allowed.shape}",
                         where="background_scores", fix="resize the images to one size first")
    bg = ~allowed
    if not bg.any():
        return {"bg_psnr": float("nan"), "bg_ssim": float("nan"), "bg_fraction": 0.0}
    diff = reference.astype(np.float64)[bg] - edited.astype(np.float64)[bg]
    mse = float((diff ** 2).mean())
    psnr = float("inf") if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)
    _, smap = structural_similarity(reference, edited, channel_axis=2, data_range=255, full=True)
    return {"bg_psnr": psnr, "bg_ssim": float(smap.mean(axis=2)[bg].mean()), "bg_fraction": float(bg.mean())}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else float("nan")


# --------------------------------------------------------------------------------------------
# toy edit pairs
# --------------------------------------------------------------------------------------------
@dataclass
class EditPair:
    """One edit of a toy scene: which object, from what to what, and the ground truth to score it."""

    id: str
    image: np.ndarray
    source: str
    target: str
    words: list[str]  # distinct shapes of the scene (the heatmap classes), drawing order
    edit_words: list[str]  # the edited object's shape in the source
    kind: str  # "colour" or "shape"
    objects: list[dict[str, Any]]  # source objects
    target_objects: list[dict[str, Any]]
    edited: int  # index of the edited object
    object_mask: np.ndarray  # visible pixels of the edited object
    allowed: np.ndarray  # where the edit may legitimately change pixels
    scene_mask: np.ndarray | None = None  # the scene's label map (object i's pixels: objects[i]["class_id"])


def _allowed_region(obj: dict[str, Any], visible: np.ndarray, size: int) -> np.ndarray:
    """Visible pixels of the object plus a disc 20% larger than its radius (a new shape may be
    a little larger than the old one, e.g. a heart replacing a star)."""
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = obj["center"]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (1.2 * obj["radius"] + 1.0) ** 2
    return disc | visible


def toy_edit_pairs(dataset: Any, n: int, *, seed: int, kinds: Sequence[str] = ("colour", "shape"),
                   min_objects: int = 2) -> list[EditPair]:
    """``n`` edit pairs from consecutive scenes of a ``toy_shapes`` split (deterministic in ``seed``).

    A scene qualifies when it has at least ``min_objects`` objects of pairwise different shapes
    (so every object is a distinct heatmap class and the oracle can tell them apart). One object
    is picked at random; its colour is changed to another palette colour or its shape to a shape
    absent from the scene, alternating by pair index through ``kinds``.
    """
    from t2ialign.plugins.datasets.toy_shapes import CLASS_NAMES, COLOURS, caption

    bad = [k for k in kinds if k not in ("colour", "shape")]
    if bad or not kinds:
        raise ConfigError(f"edit_kinds must be a non-empty list of 'colour' / 'shape', got {list(kinds)}",
                          where="config key edit_kinds", fix="use edit_kinds=[colour, shape]")
    pairs: list[EditPair] = []
    for index in range(len(dataset)):
        if len(pairs) >= n:
            break
        s = dataset[index]
        objects = s.meta["objects"]
        shapes = [o["shape"] for o in objects]
        if len(objects) < min_objects or len(set(shapes)) != len(shapes):
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, 11, index]))
        k = int(rng.integers(len(objects)))
        kind = kinds[len(pairs) % len(kinds)]
        new = [dict(o) for o in objects]
        if kind == "colour":
            choices = [c for c in COLOURS if c != objects[k]["colour"]]
            new[k]["colour"] = choices[int(rng.integers(len(choices)))]
        else:
            choices = [c for c in CLASS_NAMES if c not in shapes]
            new[k]["shape"] = choices[int(rng.integers(len(choices)))]
        visible = s.mask == objects[k]["class_id"]
        size = s.image.shape[0]
        pairs.append(EditPair(
            id=f"{s.id}_{kind}", image=s.image, source=caption(objects), target=caption(new),
            words=shapes, edit_words=[objects[k]["shape"]], kind=kind, objects=objects, target_objects=new,
            edited=k, object_mask=visible, allowed=_allowed_region(objects[k], visible, size), scene_mask=s.mask))
    return pairs


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------
def variants_of(config: dict[str, Any]) -> list[Variant]:
    """``baseline`` (uncalibrated heatmaps, gamma = 1) and ``calibrated`` (gamma) blend masks."""
    gamma = float(config["gamma"])
    if not 0 < gamma < 1:
        raise ConfigError(f"gamma must lie in (0, 1) for a calibrated blend, got {gamma}", where="config key gamma",
                          fix="use e.g. gamma=1/3 (the baseline always uses gamma = 1)")
    return [Variant("baseline", 1.0), Variant("calibrated", gamma)]


def build_editor(config: dict[str, Any], host: Host, backbone: Backbone) -> Editor:
    """An :class:`Editor` with its :class:`AlignmentPipeline` from a task config."""
    weighting = host.weighting(backbone.prediction_type, config["elbo"]["scheme"])
    pipeline = pipeline_from_config(backbone, host.extractor(backbone), weighting, config)
    if config["source"] not in ("real", "generated"):
        raise ConfigError(f"source must be 'real' or 'generated', got {config['source']!r}", where="config key source",
                          fix="real = DDIM-invert the scene image, generated = sample the source caption first")
    return Editor(backbone, pipeline, steps=int(config["steps"]), guidance=float(config["guidance"]),
                  inversion_guidance=float(config["inversion_guidance"]),
                  cross_replace_steps=float(config["cross_replace_steps"]),
                  self_replace_steps=float(config["self_replace_steps"]),
                  self_replace_max_tokens=config["self_replace_max_tokens"],
                  threshold=float(config["blend"]["threshold"]), dilate=int(config["blend"]["dilate"]),
                  inversion=config["inversion"], null_text=config["null_text"], alignment=config["alignment"],
                  reweight=config["reweight"], word_replace_steps=config["word_replace_steps"])


def colour_verdicts(oracle: Any, pair: EditPair, edited: np.ndarray, source_decoded: np.ndarray,
                    size: int) -> dict[str, float]:
    """Where-aware colour checks of one edit (the toy model renders colours, not crisp shapes).

    ``colour_edited`` (colour edits only): the edited object's visible pixels now mostly take the
    target colour. ``colour_others``: every other object's pixels take the same majority colour
    as in the source's own decode (so an object the VAE already washes out is not counted
    against the edit). Both from :meth:`ToyOracle.region_colour`; 1.0 / 0.0, NaN when undefined.
    """
    out: dict[str, float] = {"colour_edited": float("nan"), "colour_others": float("nan")}
    if pair.kind == "colour":
        got, _ = oracle.region_colour(edited, resize_mask(pair.object_mask, size))
        out["colour_edited"] = float(got == pair.target_objects[pair.edited]["colour"])
    kept = []
    for i, obj in enumerate(pair.objects):
        if i == pair.edited:
            continue
        region = resize_mask(pair.scene_mask == obj["class_id"], size)
        if region.any():
            kept.append(oracle.region_colour(edited, region)[0] == oracle.region_colour(source_decoded, region)[0])
    if kept:
        out["colour_others"] = float(all(kept))
    return out


def _optional_metric(host: Host, name: str) -> Metric | None:
    return host.metric(name) if name else None


class EditingTask:
    """Edit toy scenes with uncalibrated vs ELBO-calibrated local blends (module docstring)."""

    name = "editing"
    defaults = DEFAULTS

    def _item(self, editor: Editor, pair: EditPair, variants, config, clip, oracle, out: Path) -> dict[str, Any]:
        tic = time.perf_counter()
        size = int(editor.backbone.image_size)
        if config["source"] == "real":
            source = editor.source_from_image(pair.image, pair.source)
            reference = source.image
        else:
            from t2ialign.core.pipeline import derive_seed

            source = editor.source_from_prompt(pair.source, derive_seed(int(config["seed"]), pair.id) % (2 ** 31))
            reference = source.image
        t_source = time.perf_counter() - tic
        tic = time.perf_counter()
        masks = editor.masks(source, pair.words, pair.edit_words, variants, key=pair.id)
        t_masks = time.perf_counter() - tic
        allowed = resize_mask(pair.allowed, size)
        obj = resize_mask(pair.object_mask, size)
        record: dict[str, Any] = {"id": pair.id, "source": pair.source, "target": pair.target, "kind": pair.kind,
                                  "words": pair.words, "edit_words": pair.edit_words, "variants": {}}
        arrays: dict[str, np.ndarray] = {"source": reference}
        tic = time.perf_counter()
        for v in variants:
            res = editor.edit(source, pair.target, masks[v.name])
            m = masks[v.name]
            row: dict[str, Any] = {"mask_fraction": float(m.latent.float().mean()),
                                   "mask_iou": iou(m.region, obj), "scores": m.scores}
            # in the toy world we know where the edit may act; for "generated" sources the
            # scene is only the caption's, so the reference is the sampled source itself
            row.update(background_scores(reference, res.image, allowed if config["source"] == "real"
                                         else m.image_mask))
            row["bg_psnr_decoded"] = background_scores(res.source_decoded, res.image, m.image_mask)["bg_psnr"]
            if clip is not None:
                row["clip_score"] = float(clip.score([res.image], [pair.target])[0])
            if oracle is not None:
                verdict = oracle.check(res.image, pair.target_objects)["objects"]
                others = [x["attribute"] for i, x in enumerate(verdict) if i != pair.edited]
                row["oracle_edited"] = float(verdict[pair.edited]["attribute"])
                row["oracle_others"] = float(all(others)) if others else float("nan")
                row["oracle_full"] = float(all(x["attribute"] for x in verdict))
            if hasattr(oracle, "region_colour") and pair.scene_mask is not None:
                row.update(colour_verdicts(oracle, pair, res.image, res.source_decoded, size))
            record["variants"][v.name] = row
            arrays[f"edit_{v.name}"] = res.image
            arrays[f"mask_{v.name}"] = m.image_mask
            arrays[f"heat_{v.name}"] = np.round(m.heat.numpy() * 255).astype(np.uint8)
        record["timings"] = {"source": round(t_source, 4), "masks": round(t_masks, 4),
                             "edits": round(time.perf_counter() - tic, 4)}
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(out / "edits" / f"{safe_name(pair.id)}.npz", buf.getvalue())
        return record

    def run(self, config: dict[str, Any], host: Host) -> dict[str, Any]:
        procs = Procs()
        out = Path(config["output"])
        variants = variants_of(config)
        limit = config["limit"]
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"limit must be a positive number of edit pairs, got {limit!r}",
                              where="config key limit", fix="write e.g. limit=32")
        check_number(config, "blend.threshold", 0.0, 1.0, "0.4")
        check_number(config, "guidance", 0.0, None, "5.0")
        check_number(config, "inversion_guidance", 0.0, None, "1.0")
        with claimed_output(out, config, RESULT_KEYS, procs):
            t0 = time.perf_counter()
            backbone = host.backbone(config["backbone"], device=config["device"], dtype=config["dtype"])
            weights = check_weights(out, backbone)
            editor = build_editor(config, host, backbone)
            dataset = host.dataset(config["dataset"], config["split"])
            if not hasattr(dataset, "__getitem__") or not len(dataset) or "objects" not in dataset[0].meta:
                raise ConfigError(f"dataset '{config['dataset']}' has no toy object records",
                                  where="config key dataset",
                                  fix="the editing benchmark builds edit pairs from a toy_shapes dataset; "
                                      "edit your own images with 't2ialign edit IMAGE --source ... --target ...'")
            pairs = toy_edit_pairs(dataset, limit, seed=int(config["seed"]), kinds=config["edit_kinds"],
                                   min_objects=int(config["min_objects"]))
            clip = _optional_metric(host, config["clip_metric"])
            oracle = _optional_metric(host, config["oracle_metric"])
            t_setup = time.perf_counter() - t0
            if procs.rank == 0:
                atomic_write_text(out / "config.yaml", dump_config(config))
                record_weights(out, weights)

            t0 = time.perf_counter()
            (out / "edits").mkdir(parents=True, exist_ok=True)
            done = {r["id"] for p in out.glob("records.*.jsonl") for r in read_jsonl(p)}
            path = out / f"records.rank{procs.rank}.jsonl"
            _repair(path)
            from tqdm import tqdm

            from t2ialign.core.console import progress_disabled

            mine = [p for i, p in enumerate(pairs) if i % procs.world == procs.rank and p.id not in done]
            for pair in tqdm(mine, desc="edits", unit="pair", disable=progress_disabled(), dynamic_ncols=True):
                append_jsonl(path, self._item(editor, pair, variants, config, clip, oracle, out))
            procs.barrier()
            t_edit = time.perf_counter() - t0
            if procs.rank != 0:
                return {}
            wanted = [p.id for p in pairs]
            by_id = {r["id"]: r for p in sorted(out.glob("records.*.jsonl")) for r in read_jsonl(p)}
            records = [by_id[i] for i in wanted if i in by_id]
            results = _assemble(config, variants, records, host, len(pairs) < limit,
                                {"setup_s": t_setup, "editing_s": t_edit}, procs.world)
            atomic_write_json(out / "results.json", results)
            _write_visuals(out, config, records, results)
            return results


def _repair(path: Path) -> None:
    try:
        from t2ialign.core.fileio import repair_jsonl
    except ImportError:  # older fileio: read_jsonl tolerates a torn last line
        return
    repair_jsonl(path)


def _finite_mean(values: Sequence[float]) -> float:
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    return float(x.mean()) if x.size else float("nan")


def paired_difference(a: Sequence[float], b: Sequence[float], n: int, seed: int) -> dict[str, float]:
    """Mean of ``b - a`` over items where both are finite, with a 95% bootstrap interval."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    d = (y - x)[ok]
    if d.size == 0:
        return {"delta": float("nan"), "ci95_low": float("nan"), "ci95_high": float("nan"), "items": 0}
    res = {"delta": float(d.mean()), "ci95_low": float("nan"), "ci95_high": float("nan"), "items": int(d.size)}
    if n > 0 and d.size > 1:
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, d.size, size=(n, d.size))].mean(axis=1)
        res["ci95_low"], res["ci95_high"] = (float(v) for v in np.percentile(means, [2.5, 97.5]))
    return res


def _assemble(config, variants, records, host, short: bool, timings, world) -> dict[str, Any]:
    results: dict[str, Any] = {
        "task": "editing", "backbone": config["backbone"], "dataset": config["dataset"], "split": config["split"],
        "source_mode": config["source"], "inversion": config["inversion"], "items": len(records), "seed": config["seed"],
        "edit_kinds": {k: sum(r["kind"] == k for r in records) for k in config["edit_kinds"]},
        "blend": dict(config["blend"]), "variants": {}, "versions": versions(), "processes": world,
    }
    if short:
        results["note"] = f"the split had fewer qualifying scenes than limit={config['limit']}"
    for v in variants:
        rows = [r["variants"][v.name] for r in records]
        entry: dict[str, Any] = {"gamma": v.gamma}
        for key in ("mask_iou", "mask_fraction", "bg_psnr", "bg_ssim", "bg_psnr_decoded"):
            entry[key] = _finite_mean([row.get(key, float("nan")) for row in rows])
        if config["clip_metric"] and rows:
            metric = host.metric(config["clip_metric"])
            metric.update([None] * len(rows), [r["target"] for r in records],  # type: ignore[list-item]
                          scores=[row["clip_score"] for row in rows])
            entry["clip_score"] = metric.compute()
        if config["oracle_metric"]:
            entry["oracle"] = {k: _finite_mean([row.get(f"oracle_{k}", float("nan")) for row in rows])
                               for k in ("edited", "others", "full")}
            entry["colour"] = {k: _finite_mean([row.get(f"colour_{k}", float("nan")) for row in rows])
                               for k in ("edited", "others")}
        results["variants"][v.name] = entry
    results["paired_differences"] = {}
    for v in variants[1:]:
        diffs = {}
        for key in PAIRED_METRICS:
            a = [r["variants"]["baseline"].get(key, float("nan")) for r in records]
            b = [r["variants"][v.name].get(key, float("nan")) for r in records]
            if any(x is not None and np.isfinite(x) for x in a):  # undefined values are stored as null
                diffs[key] = paired_difference(a, b, int(config["bootstrap"]), int(config["seed"]))
        results["paired_differences"][v.name] = diffs
    per = [r["timings"] for r in records if "timings" in r]
    results["timings"] = {**{k: round(t, 3) for k, t in timings.items()},
                          "per_item_mean_s": {k: round(sum(p[k] for p in per) / len(per), 4) for k in per[0]}
                          if per else {}}
    return results


def _write_visuals(out: Path, config, records, results) -> None:
    from t2ialign.core.report import label_to_rgb, overlay, panel, save_png, write_html_report

    images = []
    for r in records[: int(config["visuals"])]:
        path = out / "edits" / f"{safe_name(r['id'])}.npz"
        if not path.exists():
            continue
        with np.load(path) as data:
            arr = {k: data[k] for k in data.files}
        src = arr["source"]
        edit_word = r["edit_words"][0] if r["edit_words"] else None
        j = r["words"].index(edit_word) if edit_word in r["words"] else 0
        tiles: list[tuple[str, np.ndarray | None]] = [("source", src)]
        for name in ("baseline", "calibrated"):
            heat = arr[f"heat_{name}"][j].astype(np.float32) / 255.0
            mask = arr[f"mask_{name}"]
            tiles += [(f"{name} heat '{edit_word}'", overlay(src, heat)),
                      (f"{name} mask", label_to_rgb(mask.astype(np.int64))),
                      (f"{name} edit", arr[f"edit_{name}"])]
        rel = f"visuals/{safe_name(r['id'])}.png"
        save_png(out / rel, panel(tiles, columns=7, scale=3 if src.shape[0] <= 128 else 1))
        images.append((f"{r['source']} -> {r['target']}", rel))
    header = ["variant", "gamma", "CLIP score", "bg PSNR", "bg PSNR vs source decode", "bg SSIM", "mask IoU",
              "mask fraction", "colour edited", "colour others kept", "oracle edited", "oracle others", "oracle full"]
    rows = []
    for name, v in results["variants"].items():
        clip = v.get("clip_score", {})
        orc = v.get("oracle", {})
        col = v.get("colour", {})
        rows.append([name, v["gamma"], clip.get("clip_score") if clip else None, v["bg_psnr"], v["bg_psnr_decoded"],
                     v["bg_ssim"], v["mask_iou"], v["mask_fraction"], col.get("edited"), col.get("others"),
                     orc.get("edited"), orc.get("others"), orc.get("full")])
    tables = [("per-variant means (blend mask from uncalibrated vs ELBO-calibrated heatmaps)", header, rows)]
    for name, diffs in results["paired_differences"].items():
        tables.append((f"{name} - baseline (paired over edit pairs, bootstrap 95% CI)",
                       ["metric", "delta", "CI95 low", "CI95 high", "items"],
                       [[k, d["delta"], d["ci95_low"], d["ci95_high"], d["items"]] for k, d in diffs.items()]))
    summary = {"backbone": results["backbone"], "dataset": results["dataset"], "items": results["items"],
               "source": results["source_mode"], "steps": config["steps"], "guidance": config["guidance"],
               "cross / self replace": f"{config['cross_replace_steps']} / {config['self_replace_steps']}"}
    write_html_report(out / "report.html", title=f"t2ialign editing: {results['backbone']} on {results['dataset']}",
                      summary=summary, tables=tables, images=images,
                      notes=["Background PSNR/SSIM compare the edit with the source image outside the edited "
                             "object's ground-truth region (its pixels plus a disc 20% larger than it).",
                             "Mask IoU: blend region (before dilation) vs the edited object's visible pixels.",
                             "Oracle: edited = the target object is found in its new colour/shape; others = "
                             "every other object is still found unchanged.",
                             "Colour: edited = the edited object's pixels mostly take the target colour (colour "
                             "edits); others kept = every other object keeps the majority colour it has in the "
                             "source's own decode."])


# --------------------------------------------------------------------------------------------
# plugin hooks
# --------------------------------------------------------------------------------------------
@hookimpl
def t2ialign_plugin_info() -> PluginInfo:
    return PluginInfo(provides={"tasks": {"editing": {}}},
                      description="Prompt-to-Prompt editing with an ELBO-calibrated local blend")


@hookimpl
def t2ialign_make_task(spec: EntrySpec) -> EditingTask | None:
    return EditingTask() if spec.plugin == "editing" else None
