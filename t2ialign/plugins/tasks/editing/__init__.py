"""Text-guided editing: Prompt-to-Prompt attention control with an ELBO-calibrated local blend.

Method (method-spec §10; Prompt-to-Prompt, Hertz et al. 2022, re-implemented here):

1. **Source trajectory.** A real image is DDIM-inverted under its source caption
   (:mod:`t2ialign.core.inversion`); for a generated source the caption is sampled first and its
   latents are recorded. Either way we hold the latent ``z_k`` of the source at every step ``k``.
2. **Attention control.** Source and target prompts are sampled as one batch from ``z_0`` with
   our own attention processors (installed with diffusers' ``Attention.set_processor`` by the
   controller that the backbone's extractor plugin builds through the hook
   ``t2ialign_make_attention_editor``, for UNets
   :class:`~t2ialign.plugins.extractors.unet_editing.AttentionEditController`; removed on exit,
   also on errors -- no ``forward`` is patched). For the first ``cross_replace_steps`` fraction
   of the steps the target row's cross-attention probabilities on *aligned* tokens are
   overwritten by the source row's; for the first ``self_replace_steps`` fraction the target's self-attention probabilities are the
   source's (only in layers with at most ``self_replace_max_tokens`` query tokens, as
   Prompt-to-Prompt does, because the full-resolution maps are huge and carry little layout).
   Token alignment (:func:`~.alignment.align_prompts`) works on whitespace-separated words:
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

The task (``t2ialign eval editing``, :mod:`.task`) builds edit pairs (:mod:`.pairs`) from toy scenes: a caption with one
object's colour or shape swapped, and scores both variants: CLIP score of the edit to the
target prompt, background PSNR/SSIM outside the edited object's ground-truth region, IoU of
the blend mask with that object, and the toy oracle (edited object changed, others kept).

Modules: :mod:`.alignment` (token alignment of two prompts), :mod:`.editor` (source trajectory,
local blend, :class:`~.editor.Editor`), :mod:`.pairs` (toy edit pairs), :mod:`.measurements`
(background and colour scores), :mod:`.task` (the task and its plugin hooks), :mod:`.commands`
(``t2ialign edit``). This file imports nothing: ``t2ialign --help`` loads :mod:`.commands`, and
Python runs this package file first, so torch must not be imported here.
"""
