"""The CLIP score metric: ``100 * cos`` of image and prompt embeddings, averaged over prompts.

Score of one image with its prompt = ``100 * cos(f_img, f_txt)`` of the CLIP image and text
embeddings, **unclamped**. The reported number is the mean over prompts of each prompt's mean
score (prompts with several images count once), with a 95% confidence interval over prompts
(Student t on the per-prompt means, :func:`t2ialign.core.stats.ci95_from_sums`).

Why this definition (anchors.md §6: scores are not comparable across tools):

* the ELBO-T2IAlign reference reads Hugging Face ``CLIPModel.logits_per_image``, which is
  ``logit_scale.exp() * cos``; with the trained OpenAI scale (exp = 100) that is ``100 * cos``.
  We fix the factor at 100 instead of reading the model's scale, so a model with another learned
  temperature (e.g. the toy CLIP) is still on the familiar 0..100 scale;
* torchmetrics' ``CLIPScore`` clamps ``max(100 * cos, 0)``; clamping biases the mean upwards for
  poorly aligned images (a negative cosine is information), so we do not clamp;
* Attend-and-Excite averages raw cosines over 80 prompt templates; we score the prompt as given.

The metric works with any open_clip-style model (``encode_image``, ``encode_text``, an eval
transform and a tokenizer); which model is the plugins' business: ``clip_score`` loads open_clip
checkpoints, the toy world's plugin answers ``toy: true`` with its own toy CLIP. Both build the
metric through :func:`clip_score_metric`, so options mean the same for every model.

State across processes: sums, sums of squares and counts of per-prompt means (all images of
one prompt must be scored in the same process, which is how the tasks shard).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from t2ialign.core.errors import InputError
from t2ialign.core.stats import ci95_from_sums

#: options every CLIP-score registry entry understands, whatever its model (name -> default)
METRIC_OPTIONS: dict[str, Any] = {"device": "cpu", "batch_size": 32}


class ClipScore:
    """CLIP score metric (see module docstring); satisfies :class:`t2ialign.core.protocols.Metric`.

    ``model``: an open_clip ``CLIP`` model; ``preprocess``: its eval transform (PIL -> tensor);
    ``tokenizer``: its tokenizer (list of str -> token ids).
    """

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, *, device: str = "cpu", batch_size: int = 32,
                 name: str = "clip_score"):
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.name = name
        self.reset()

    # ------------------------------------------------------------------ scoring
    def _image_batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        from PIL import Image

        tensors = []
        for i, img in enumerate(images):
            arr = np.asarray(img)
            if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
                raise InputError(f"image {i} must be H x W x 3 uint8, got shape {arr.shape} dtype {arr.dtype}",
                                 where=f"metric {self.name}", fix="pass RGB uint8 arrays (as sample() returns)")
            tensors.append(self.preprocess(Image.fromarray(arr)))
        return torch.stack(tensors).to(self.device)

    @torch.no_grad()
    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> torch.Tensor:
        """``100 * cos(image_i, prompt_i)`` per pair, float64 ``(N,)``, unclamped."""
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise InputError(f"{len(images)} images but {len(prompts)} prompts", where=f"metric {self.name}",
                             fix="pass one prompt per image")
        out = []
        for start in range(0, len(images), self.batch_size):
            img = self._image_batch(images[start:start + self.batch_size])
            tok = self.tokenizer(prompts[start:start + self.batch_size]).to(self.device)
            f_img = torch.nn.functional.normalize(self.model.encode_image(img).double(), dim=-1)
            f_txt = torch.nn.functional.normalize(self.model.encode_text(tok).double(), dim=-1)
            out.append(100.0 * (f_img * f_txt).sum(-1))
        return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.float64)

    # ------------------------------------------------------------------ metric protocol
    def reset(self) -> None:
        self._sum = 0.0
        self._sum_sq = 0.0
        self._prompts = 0
        self._images = 0

    def update(self, images: Sequence[np.ndarray], prompts: Sequence[str],
               scores: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
        """Score the images (or take precomputed ``scores``) and add one mean per distinct prompt.

        All images of a prompt must come in the same ``update`` call (a prompt seen again later
        counts as another prompt -- use one call per prompt or per batch of whole prompts).
        Returns the per-image scores.
        """
        prompts = list(prompts)
        s = self.score(images, prompts) if scores is None else torch.as_tensor(scores, dtype=torch.float64)
        if s.numel() != len(prompts):
            raise InputError(f"{s.numel()} scores for {len(prompts)} prompts", where=f"metric {self.name}")
        by_prompt: dict[str, list[float]] = {}
        for p, v in zip(prompts, s.tolist()):
            by_prompt.setdefault(p, []).append(v)
        for values in by_prompt.values():
            m = sum(values) / len(values)
            self._sum += m
            self._sum_sq += m * m
            self._prompts += 1
        self._images += len(prompts)
        return s

    def compute(self) -> dict[str, Any]:
        stats = ci95_from_sums(self._sum, self._sum_sq, self._prompts)
        return {"clip_score": stats["mean"], "ci95_low": stats["ci95_low"], "ci95_high": stats["ci95_high"],
                "std_over_prompts": stats["std"], "prompts": self._prompts, "images": self._images}

    def state(self) -> dict[str, torch.Tensor]:
        return {"sum": torch.tensor(self._sum, dtype=torch.float64),
                "sum_sq": torch.tensor(self._sum_sq, dtype=torch.float64),
                "prompts": torch.tensor(self._prompts, dtype=torch.int64),
                "images": torch.tensor(self._images, dtype=torch.int64)}

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        self._sum += float(state["sum"])
        self._sum_sq += float(state["sum_sq"])
        self._prompts += int(state["prompts"])
        self._images += int(state["images"])


def clip_score_metric(load: Callable[[str], tuple[Any, Any, Any]], options: dict[str, Any],
                      name: str = "clip_score") -> ClipScore:
    """A :class:`ClipScore` from registry options, its model from ``load(device)``.

    ``load`` returns ``(model, preprocess, tokenizer)`` on the given device; ``options`` may hold
    ``device`` and ``batch_size`` (:data:`METRIC_OPTIONS` fills what is missing).
    """
    opts = {**METRIC_OPTIONS, **options}
    device = str(opts.get("device") or "cpu")
    model, preprocess, tokenizer = load(device)
    return ClipScore(model, preprocess, tokenizer, device=device, batch_size=int(opts["batch_size"]), name=name)


__all__ = ["METRIC_OPTIONS", "ClipScore", "clip_score_metric"]
