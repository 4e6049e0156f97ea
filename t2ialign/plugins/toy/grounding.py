"""Optional grounding loss for the toy model: teach a class word's cross-attention where its object is.

Why it exists: trained on the denoising loss alone for the 60-90 CPU minutes the toy budget allows,
the toy UNet's cross-attention stays close to uniform over the text (docs/toy.md measures it), so
attention maps cannot separate the classes of a scene -- unlike SD's, which localise words after
hundreds of thousands of GPU steps on billions of images. An auxiliary token-level grounding loss
in the manner of TokenCompose (Wang et al., CVPR 2024, "TokenCompose: Text-to-Image Diffusion with
Token-level Supervision") stands in for that scale: for every class word of the caption, the share
of its attention mass (over the pixels of a cross-attention layer) that falls outside the class's
ground-truth mask is penalised, ``(1 - sum_in_mask A / sum A) ** 2``.

It supervises only the shape-class words (not colours, sizes or padding), only at timesteps where
the noisy latent still shows the layout (``t < max_t``), with the same weight for every class.
The data bias is left in place: a rare class is supervised as rarely as it is seen, and a small
object's mask covers few latent pixels. The denoising loss is unchanged; this term is added to it.

Capture uses :class:`~t2ialign.core.attention_processors.ProjectionRecorder` (diffusers' processor
API), as the toolkit's attention extractor does: forward hooks on ``attn2.to_q`` / ``to_k`` keep
the projections the original processor computes (here with their gradients), and the layer output
comes from the original processor unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from t2ialign.core.attention_processors import ProjectionRecorder, probs_from_projections, recorders_installed
from t2ialign.core.errors import ConfigError


def class_token_table(tokenizer: Any, class_names: Sequence[str]) -> torch.Tensor:
    """``table[token_id]`` = class id (1-based, position in ``class_names`` + 1) of a class-name token, else 0.

    A class name that the BPE splits (``hexagon`` -> ``hex`` + ``agon``) maps all its pieces; the
    pieces must not be shared by two classes, or a word could not be told apart.
    """
    table = torch.zeros(len(tokenizer), dtype=torch.long)
    for cid, name in enumerate(class_names, start=1):
        for tok in tokenizer(name, add_special_tokens=False).input_ids:
            if table[tok] not in (0, cid):
                raise ConfigError(f"class names share the token {tok} ({name!r})", where="toy grounding loss",
                                  fix="use class names whose BPE pieces differ")
            table[tok] = cid
    return table


def word_token_ids(tokenizer: Any, words: Sequence[str]) -> torch.Tensor:
    """The token ids of ``words`` (every BPE piece of each), for :func:`attribute_token_classes`."""
    ids = sorted({tok for w in words for tok in tokenizer(w, add_special_tokens=False).input_ids})
    return torch.tensor(ids, dtype=torch.long)


def attribute_token_classes(ids: torch.Tensor, token_classes: torch.Tensor, attribute_ids: torch.Tensor) -> torch.Tensor:
    """Class ids of text positions with attribute words bound to the object they describe.

    ``ids``: ``(B, K)`` token ids; ``token_classes``: ``(B, K)`` class id of each class-word
    position (0 elsewhere, from :func:`class_token_table`); ``attribute_ids``: token ids of the
    attribute words (colours). In a toy caption an attribute precedes its noun ("a small red
    circle"), so an attribute position takes the class of the next class word of its row (0 if
    none follows). Returns ``token_classes`` with those positions filled in: supervising them
    teaches the colour word to attend to *its* object, which is what binds a colour to a shape.
    """
    out = token_classes.clone()
    is_attr = torch.isin(ids, attribute_ids)
    if not bool(is_attr.any()):
        return out
    k = ids.shape[1]
    pos = torch.arange(k).expand_as(ids)
    # index of the next class-word position at or after each position (k = none), by a reverse running min
    marked = torch.where(token_classes > 0, pos, torch.full_like(pos, k))
    nxt = torch.flip(torch.cummin(torch.flip(marked, [1]), dim=1).values, [1])
    following = torch.gather(torch.cat([token_classes, torch.zeros_like(token_classes[:, :1])], 1), 1, nxt)
    out[is_attr] = following[is_attr]
    return out


def pooled_masks(masks: np.ndarray | torch.Tensor, n_classes: int, size: int) -> torch.Tensor:
    """Per-class area fractions ``(B, n_classes + 1, size, size)`` of integer masks ``(B, H, W)``."""
    m = torch.as_tensor(masks).long()
    onehot = F.one_hot(m, n_classes + 1).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(onehot, size)


class GroundingProbe(ProjectionRecorder):
    """Keeps the head-averaged cross-attention probabilities of one layer, with their graph."""

    keep_graph = True

    def __init__(self, inner: Any, sink: list[torch.Tensor]) -> None:
        super().__init__(inner)
        self.sink = sink

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        out, seen = self.delegate_and_record(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        if "q" not in seen or "k" not in seen:
            raise ConfigError("the toy UNet's cross-attention processor did not call to_q/to_k",
                              where="toy grounding loss", fix="train with diffusers' default attention processors")
        # one block for all rows: the toy maps are at most 256 x 77 per head
        self.sink.append(probs_from_projections(attn, seen["q"], seen["k"], chunk_bytes=1 << 40,
                                                logits_dtype=torch.float32))
        return out


@contextmanager
def probe_cross_attention(unet: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every cross-attention layer of ``unet`` appends its ``(B, Q, K)`` map to the yielded list."""
    sink: list[torch.Tensor] = []
    layers = {name: mod for name, mod in unet.named_modules()
              if name.endswith("attn2") and hasattr(mod, "set_processor")}
    if not layers:
        raise ConfigError("the toy UNet has no cross-attention layers (attn2)", where="toy grounding loss",
                          fix="build the UNet with CrossAttn blocks")
    with recorders_installed(layers, lambda _name, inner: GroundingProbe(inner, sink)):
        yield sink


def grounding_loss(maps: Sequence[torch.Tensor], token_classes: torch.Tensor, masks: torch.Tensor,
                   keep: torch.Tensor) -> torch.Tensor:
    """Mean over layers and supervised (image, token) pairs of ``(1 - attention share inside the mask) ** 2``.

    ``maps``: per layer ``(B, Q, K)`` with ``Q`` a square grid; ``token_classes``: ``(B, K)`` class
    id of each text position (0 = not a class word); ``masks``: ``(B, C + 1, H, W)`` per-class area
    fractions at the finest grid (pooled further for coarser layers); ``keep``: ``(B,)`` bool, the
    images whose timestep is supervised. Returns 0 (with a graph) when nothing is supervised.
    """
    sel = (token_classes > 0) & keep[:, None]
    b_idx, k_idx = sel.nonzero(as_tuple=True)
    total = maps[0].sum() * 0.0
    if b_idx.numel() == 0:
        return total
    cls = token_classes[b_idx, k_idx]
    for probs in maps:
        side = int(round(probs.shape[1] ** 0.5))
        grid = F.adaptive_avg_pool2d(masks, side).flatten(2)  # (B, C+1, Q)
        attn = probs[b_idx, :, k_idx]  # (N, Q): where each supervised word's attention lands
        inside = grid[b_idx, cls]  # (N, Q): fraction of each cell covered by the word's class
        share = (attn * inside).sum(-1) / attn.sum(-1).clamp_min(1e-12)
        total = total + ((1.0 - share) ** 2).mean()
    return total / len(maps)


def pixel_mass_loss(maps: Sequence[torch.Tensor], token_classes: torch.Tensor, masks: torch.Tensor,
                    keep: torch.Tensor, target: float) -> torch.Tensor:
    """Mean over layers of ``relu(target - mass) ** 2`` over the pixels of captioned objects.

    ``mass`` = how much of a pixel's attention goes to the words of the object covering it (its
    class word and, with :func:`attribute_token_classes`, its colour word), weighted by the
    object's area fraction in the cell. :func:`grounding_loss` only says *where* a word's own
    attention lands; without this term a pixel still reads almost everything from the padding
    positions, which summarise the whole caption, so a colour is not tied to its object (most of
    the toy model's attention went to padding). Arguments as :func:`grounding_loss`.
    """
    n_cls = masks.shape[1]
    onehot = F.one_hot(token_classes.clamp_min(0), n_cls).float()  # (B, K, C+1)
    onehot[..., 0] = 0.0
    present = (onehot.sum(1) > 0) & keep[:, None]  # (B, C+1): classes named in the caption
    total = maps[0].sum() * 0.0
    if not bool(present.any()):
        return total
    for probs in maps:
        side = int(round(probs.shape[1] ** 0.5))
        grid = F.adaptive_avg_pool2d(masks, side).flatten(2)  # (B, C+1, Q)
        mass = torch.einsum("bqk,bkc->bcq", probs, onehot)  # (B, C+1, Q)
        weight = grid * present[..., None]
        total = total + (weight * F.relu(target - mass) ** 2).sum() / weight.sum().clamp_min(1e-12)
    return total / len(maps)


__all__ = ["GroundingProbe", "attribute_token_classes", "class_token_table", "grounding_loss", "pixel_mass_loss", "pooled_masks",
           "probe_cross_attention", "word_token_ids"]
