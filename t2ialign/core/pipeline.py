"""ELBO-T2IAlign for one image: class ELBOs -> alignment scores -> calibrated, propagated heatmaps.

This is the method of method-spec §4-7 written once, for any backbone that satisfies the
``Backbone`` protocol and any extractor that hooks it:

1. encode the image (VAE posterior mean);
2. attention pass: the joint prompt "a photo of c1, c2, ..." at the collect timesteps (fresh
   noise per timestep, no CFG), batched; cross maps of the class token columns and self maps of
   the layers that the aggregation weights actually use, head/time-averaged -- by default as the
   layers' recorded q/k factors (``self_maps="fused"``), never as ``Q x Q`` maps;
3. ELBO pass (only when a variant needs it): per-class losses from the weighting plugin with
   one noise draw per timestep shared by all classes;
4. per variant (baseline gamma = 1, calibrated gamma, fixed-S...): scores S, min-max + ``A ** (1/S)``,
   propagation with the aggregated self-attention (all variants' maps in one pass: with fused
   self maps that is one attention product per layer and step), bilinear upsampling to the
   image size, per-class min-max.

All variants of one image share steps 1-3, so the uncalibrated baseline costs nothing extra.
Noise comes from a generator seeded by ``(seed, image key)``: an image gets the same noise
whatever the order, sharding or resumption of a run.
"""

from __future__ import annotations

import hashlib
import math
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from t2ialign.core.aggregation import (
    SelfPropagation,
    aggregate_cross,
    cross_layer_weights,
    needed_layers,
    propagate,
    self_layer_weights,
    self_steps,
)
from t2ialign.core.attention_store import SELF_MAP_MODES
from t2ialign.core.calibration import alignment_scores, calibrate, fixed_scores, minmax
from t2ialign.core.elbo import ELBOResult, estimate_class_losses
from t2ialign.core.errors import ConfigError, InputError, NumericalError
from t2ialign.core.protocols import AttentionExtractor, Backbone, LayerInfo, Weighting
from t2ialign.core.timesteps import parse_timesteps


@dataclass(frozen=True)
class Variant:
    """One way of turning the shared passes into heatmaps.

    ``gamma = 1`` is the uncalibrated baseline; ``fixed = True`` is the fixed-S ablation
    (every class gets ``S = gamma`` whatever its ELBO).
    """

    name: str
    gamma: float
    fixed: bool = False

    @property
    def needs_elbo(self) -> bool:
        return self.gamma < 1.0 and not self.fixed


@dataclass
class AlignmentResult:
    """Heatmaps and the numbers behind them for one image."""

    words: list[str]
    heatmaps: dict[str, torch.Tensor]  # variant -> (C, H, W) in [0, 1]
    scores: dict[str, torch.Tensor]  # variant -> (C,)
    elbo: ELBOResult | None
    timings: dict[str, float] = field(default_factory=dict)
    forwards: dict[str, int] = field(default_factory=dict)


def derive_seed(seed: int, key: str) -> int:
    """A 63-bit seed from the run seed and an item key (stable across processes and Python runs)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 (or float in [0, 1]) -> ``(1, 3, H, W)`` float32 in [0, 1]."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"expected an H x W x 3 RGB image, got an array of shape {image.shape}",
                         fix="convert the image to RGB first (t2ialign.core.images.load_rgb does)")
    arr = image.astype(np.float32)
    if image.dtype == np.uint8:
        arr /= 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]


def check_class_words(words: Sequence[Any], where: str = "class list") -> list[str]:
    """The class words as strings, or an :class:`InputError` naming the first bad one.

    Refused: an empty list, a non-string or empty/blank word, a word with invisible control or
    format characters (a NUL or zero-width space tokenizes to junk tokens that silently "work"),
    and duplicates (two identical words get the same token columns, so one heatmap would be
    reported twice). Punctuation and any visible unicode are fine: whether the model *knows*
    the word is a modelling question, not an input error.
    """
    if isinstance(words, str):
        raise InputError(f"the class list is a single string {words!r}, expected a list of words", where=where,
                         fix=f"pass a list, e.g. [{words!r}]")
    words = list(words)
    if not words:
        raise InputError("the class list is empty", where=where,
                         fix="give at least one class word (e.g. --classes cat dog)")
    for i, word in enumerate(words, 1):
        if not isinstance(word, str):
            raise InputError(f"class word {i} is {type(word).__name__} {word!r}, expected a string", where=where,
                             fix="pass class names as text")
        if not word.strip():
            raise InputError(f"class word {i} of {words!r} is empty", where=where,
                             fix="remove the empty word or give it a name (check for stray quotes or commas)")
        hidden = [c for c in word if unicodedata.category(c) in ("Cc", "Cf")]
        if hidden:
            raise InputError(
                f"class word {i} {word!r} contains invisible control/format characters "
                f"{[f'U+{ord(c):04X}' for c in hidden]}",
                where=where,
                fix="retype the word without them (they come from copy-pasting formatted text)",
            )
    if len(set(words)) != len(words):
        dups = sorted({w for w in words if words.count(w) > 1})
        raise InputError(f"duplicate class words {dups}", where=where, fix="give each class once")
    return words


def _check_template(template: str, field_: str, name: str) -> None:
    """A prompt template must contain ``field_`` and no other ``{...}`` placeholder."""
    if field_ not in template:
        raise ConfigError(f"prompt template '{template}' has no {field_} placeholder", where=f"config key {name}",
                          fix=f"write e.g. 'a photo of {field_}'")
    try:
        template.format(**{field_[1:-1]: "x"})
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"prompt template '{template}' cannot be filled in ({type(exc).__name__}: {exc})",
            where=f"config key {name}",
            fix=f"use only the placeholder {field_}; write literal braces as {{{{ and }}}}",
        ) from exc


#: storage dtypes accepted for fused self-attention factors (``None`` = as the projections come)
FACTOR_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _check_self_maps(mode: str, dtype: str | None, device: str | None) -> tuple[torch.dtype | None, str | None]:
    if mode not in SELF_MAP_MODES:
        raise ConfigError(f"self_maps must be one of {list(SELF_MAP_MODES)}, got {mode!r}", where="config key self_maps",
                          fix="use self_maps=fused (default: no Q x Q maps) or self_maps=explicit (parity/debugging)")
    if dtype is not None and dtype not in FACTOR_DTYPES:
        raise ConfigError(f"self_factors.dtype must be null or one of {list(FACTOR_DTYPES)}, got {dtype!r}",
                          where="config key self_factors.dtype",
                          fix="e.g. self_factors.dtype=bfloat16 halves what the fused path keeps")
    if device is not None and device != "cpu":
        raise ConfigError(f"self_factors.device must be null (where the model runs) or 'cpu', got {device!r}",
                          where="config key self_factors.device",
                          fix="self_factors.device=cpu keeps the q/k factors in host memory")
    return (None if dtype is None else FACTOR_DTYPES[dtype]), device


def _check_factor_budget(max_mib: float | str | None) -> int | str | None:
    """``self_factors.max_mib`` -> the store's ``factor_budget`` (bytes, ``"auto"``, ``"explicit"``
    or ``None`` = unbounded). ``None`` (the default) means ``"auto"``: never above the explicit
    path's peak; ``"unbounded"`` keeps every factor whatever it costs."""
    if max_mib is None:
        return "auto"
    if max_mib == "unbounded":
        return None
    if max_mib in ("explicit", "auto"):
        return max_mib
    ok = isinstance(max_mib, (int, float)) and not isinstance(max_mib, bool) and math.isfinite(max_mib) and max_mib >= 0
    if not ok:
        raise ConfigError(f"self_factors.max_mib must be null (= auto), 'auto', 'explicit', 'unbounded' or a number "
                          f"of MiB >= 0, got {max_mib!r}",
                          where="config key self_factors.max_mib",
                          fix="auto (default) keeps the fused path within the explicit path's peak, explicit within "
                              "its kept maps (layers past the budget are folded into explicit maps); unbounded "
                              "never folds")
    return int(float(max_mib) * 2**20)


def _check_finite(t: torch.Tensor, stage: str, key: str) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise NumericalError(
            f"{bad} NaN/Inf values in {stage}",
            where=f"item {key}",
            fix="run the denoiser in float32 (dtype=float32), check the model weights, "
                "or report the item id if it happens with a healthy model",
        )


class AlignmentPipeline:
    """Calibrated word heatmaps for one image at a time (see module docstring)."""

    def __init__(
        self,
        backbone: Backbone,
        extractor: AttentionExtractor,
        weighting: Weighting | None,
        *,
        elbo_prompt: str = "a photo of {cls}",
        source_prompt: str = "a photo of {classes}",
        elbo_timesteps: Sequence[Any] = ((1, 999, 50),),
        collect_timesteps: Sequence[Any] = ((20, 201, 20),),
        elbo_batch_size: int = 8,
        collect_batch_size: int = 10,
        elbo_antithetic: bool = False,
        cross_weight: Sequence[float] | None = None,
        cross_gaussian_sigma: float | None = None,
        self_weight: Sequence[Sequence[float]] | None = None,
        prefactor_exponent: float | None = None,
        seed: int = 4307,
        self_maps: str = "fused",
        self_factor_dtype: str | None = None,
        self_factor_device: str | None = None,
        self_factor_max_mib: float | str | None = None,
    ):
        self.backbone = backbone
        self.extractor = extractor
        self.weighting = weighting
        self.elbo_prompt = elbo_prompt
        self.source_prompt = source_prompt
        self.elbo_timesteps = [list(e) for e in elbo_timesteps]
        self.collect_timesteps = [list(e) for e in collect_timesteps]
        self.elbo_batch_size = int(elbo_batch_size)
        self.elbo_antithetic = bool(elbo_antithetic)  # noise pairs +eps/-eps (core/elbo.py)
        self.collect_batch_size = int(collect_batch_size)
        self.prefactor_exponent = prefactor_exponent
        self.seed = int(seed)
        self.self_maps = self_maps
        self.factor_dtype, self.factor_device = _check_self_maps(self_maps, self_factor_dtype, self_factor_device)
        self.factor_budget = _check_factor_budget(self_factor_max_mib)
        for name, tmpl, field_ in (("elbo.prompt", elbo_prompt, "{cls}"), ("collect.prompt", source_prompt, "{classes}")):
            _check_template(tmpl, field_, name)
        defaults = dict(getattr(backbone, "layer_defaults", {}) or {})
        cw = cross_weight if cross_weight is not None else defaults.get("cross_weight")
        sigma = cross_gaussian_sigma if cross_gaussian_sigma is not None else defaults.get("cross_gaussian_sigma", 0.0)
        self.self_rows = [list(r) for r in (self_weight if self_weight is not None else defaults.get("self_weight", []))]
        layers: list[LayerInfo] = backbone.attention_layers()
        # joint (MM-DiT) layers give both an image->text and an image->image block
        self.cross_layers = [l for l in layers if l.kind in ("cross", "joint")]
        self.self_layers = [l for l in layers if l.kind in ("self", "joint")]
        if not self.cross_layers:
            raise ConfigError(f"backbone {backbone.name} reports no cross/joint attention layers",
                              fix="check the backbone plugin's attention_layers()")
        self.cross_weights = cross_layer_weights(
            self.cross_layers, group_weights=None if sigma and sigma > 0 else cw, gaussian_sigma=float(sigma or 0.0)
        )
        self.cross_names = needed_layers(self.cross_layers, self.cross_weights)
        # validated here, so a bad self_weight fails before the first image, not at it
        self.self_names = (needed_layers(self.self_layers, self_layer_weights(self.self_layers, self.self_rows))
                           if self.self_rows else [])
        grids = [l.grid for l in self.cross_layers]
        self.out_grid = max(grids, key=lambda g: g[0] * g[1])

    # ------------------------------------------------------------------ passes
    def _attention(self, z0: torch.Tensor, words: list[str], gen: torch.Generator, key: str):
        bb = self.backbone
        prompt = self.source_prompt.format(classes=", ".join(words))
        spans = [bb.token_spans(prompt, w) for w in words]
        columns = sorted({i for span in spans for i in span})
        col_of = {c: j for j, c in enumerate(columns)}
        cond = bb.encode_text([prompt])
        ts = parse_timesteps(self.collect_timesteps, seed=derive_seed(self.seed, key + ":collect-t"))
        noise = torch.randn((len(ts), *z0.shape[1:]), generator=gen).to(z0.device, z0.dtype)
        t_all = torch.tensor(ts, dtype=torch.float32)
        forwards = 0
        with self.extractor.capture(cross_layers=self.cross_names, self_layers=self.self_names,
                                    token_indices=columns) as store:
            store.reduce_batch = True
            store.self_maps = self.self_maps
            store.factor_dtype, store.factor_device = self.factor_dtype, self.factor_device
            store.factor_budget = self.factor_budget
            for start in range(0, len(ts), self.collect_batch_size):
                t = t_all[start : start + self.collect_batch_size].to(z0.device)
                z_t = bb.add_noise(z0.expand(len(t), *z0.shape[1:]), t, noise[start : start + len(t)])
                out = bb.predict(z_t, t, cond.select([0] * len(t)))
                _check_finite(out, "the attention-collection forward pass", key)
                forwards += 1
            cross = {n: m[0] for n, m in store.cross.items()}
            selfm = {n: m[0] for n, m in store.self_.items()}
            factors = store.self_factors
        agg = aggregate_cross(cross, self.cross_layers, self.cross_weights, self.out_grid)  # (columns, R, R)
        # a class spanning several tokens ("traffic light") gets the mean of its token maps
        maps = torch.stack([agg[[col_of[i] for i in span]].mean(0) for span in spans])
        K: SelfPropagation | list[torch.Tensor] | None = None
        if self.self_rows and factors:
            # fused: the recorded q/k apply each layer's mean map to the class maps later, as one
            # attention product (an extractor without factor support filled selfm instead)
            K = SelfPropagation(factors, self.self_layers, self.self_rows, self.out_grid)
        elif self.self_rows:
            # the steps K_0, K_1.. are applied one by one to the maps: forming K = K_1 K_0 would cost
            # an M^3 product (2.6 s per image for SD1.5 on one CPU core, benchmarks/speed.py)
            K = self_steps(selfm, self.self_layers, self.self_rows, self.out_grid)
        _check_finite(maps, "the aggregated cross-attention maps", key)
        return maps, K, forwards

    def _elbo(self, z0: torch.Tensor, words: list[str], gen: torch.Generator, key: str) -> ELBOResult:
        if self.weighting is None:
            raise ConfigError("a calibrated variant needs an ELBO weighting, but none was given")
        cond = self.backbone.encode_text([self.elbo_prompt.format(cls=w) for w in words])
        ts = parse_timesteps(self.elbo_timesteps, seed=derive_seed(self.seed, key + ":elbo-t"))
        try:
            result = estimate_class_losses(self.backbone, self.weighting, z0, cond, ts,
                                           batch_size=self.elbo_batch_size, generator=gen,
                                           antithetic=self.elbo_antithetic)
        except NumericalError as exc:
            # the engine knows the stage, only the pipeline knows the image: report both
            raise NumericalError(exc.what, where=f"item {key}, {exc.where or 'ELBO pass'}", fix=exc.fix) from exc
        _check_finite(result.loss, "the per-class ELBO estimates", key)
        return result

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def run(self, image: np.ndarray, words: Sequence[str], variants: Sequence[Variant], key: str = "image") -> AlignmentResult:
        """Heatmaps of ``words`` on ``image`` (``H x W x 3`` uint8) for every variant."""
        words = check_class_words(words, where=f"item {key}")
        timings: dict[str, float] = {}
        gen = torch.Generator().manual_seed(derive_seed(self.seed, key))
        tic = time.perf_counter()
        x = image_to_tensor(image).to(self.backbone.device)
        z0 = self.backbone.encode_image(x)
        _check_finite(z0, "the VAE latent", key)
        timings["encode"] = time.perf_counter() - tic

        tic = time.perf_counter()
        maps, K, n_collect = self._attention(z0, words, gen, key)
        timings["attention"] = time.perf_counter() - tic

        elbo = None
        if any(v.needs_elbo for v in variants) and len(words) > 1:
            tic = time.perf_counter()
            elbo = self._elbo(z0, words, gen, key)
            timings["elbo"] = time.perf_counter() - tic

        tic = time.perf_counter()
        scores, calibrated = {}, []
        for v in variants:
            if v.fixed:
                s = fixed_scores(len(words), v.gamma)
            elif v.gamma >= 1.0 or elbo is None:
                s = torch.ones(len(words))
            else:
                s = alignment_scores(elbo.loss, v.gamma)
            calibrated.append(calibrate(maps, s.to(maps.device), prefactor_exponent=self.prefactor_exponent))
            scores[v.name] = s.cpu()
        # propagation is linear and per map: every variant's maps go through it together
        spread = propagate(K, torch.cat(calibrated)) if K is not None and calibrated else None
        timings["propagate"] = time.perf_counter() - tic

        tic = time.perf_counter()
        H, W = image.shape[:2]
        heatmaps = {}
        for i, v in enumerate(variants):
            heat = calibrated[i] if spread is None else spread[i * len(words) : (i + 1) * len(words)]
            heat = F.interpolate(heat[None].float(), size=(H, W), mode="bilinear", align_corners=False)[0]
            heat = minmax(heat.flatten(1), dim=1).view_as(heat)
            _check_finite(heat, f"the {v.name} heatmaps", key)
            heatmaps[v.name] = heat.cpu()
        timings["postprocess"] = time.perf_counter() - tic
        forwards = {"collect": n_collect,
                    "elbo": 0 if elbo is None else -(-len(words) * len(elbo.t) // self.elbo_batch_size)}
        return AlignmentResult(words, heatmaps, scores, elbo, timings, forwards)


def pipeline_from_config(backbone: Backbone, extractor: AttentionExtractor, weighting: Weighting | None,
                         config: dict[str, Any]) -> AlignmentPipeline:
    """An :class:`AlignmentPipeline` from a task config's ``elbo`` / ``collect`` / ``layers`` /
    ``prefactor_exponent`` / ``seed`` keys (the schema the segmentation, heatmap and editing
    tasks share) and the optional ``self_maps`` / ``self_factors: {dtype, device, max_mib}`` keys
    (default fused, factors kept as computed, within the explicit path's peak)."""
    elbo, collect, layers = config["elbo"], config["collect"], config["layers"]
    factors = config.get("self_factors") or {}
    return AlignmentPipeline(
        backbone, extractor, weighting,
        elbo_prompt=elbo["prompt"], source_prompt=collect["prompt"],
        elbo_timesteps=elbo["timesteps"], collect_timesteps=collect["timesteps"],
        elbo_batch_size=elbo["batch_size"], collect_batch_size=collect["batch_size"],
        elbo_antithetic=elbo.get("antithetic", False),
        cross_weight=layers["cross_weight"], cross_gaussian_sigma=layers["cross_gaussian_sigma"],
        self_weight=layers["self_weight"], prefactor_exponent=config["prefactor_exponent"], seed=config["seed"],
        self_maps=config.get("self_maps", "fused"), self_factor_dtype=factors.get("dtype"),
        self_factor_device=factors.get("device"), self_factor_max_mib=factors.get("max_mib"),
    )
