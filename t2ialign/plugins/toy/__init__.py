"""The toy world as one plugin package: scenes, prompts, oracle, toy CLIP and the toy model's training.

Offered to the rest of the toolkit only through the host (entry points of group ``t2ialign``):
``toy_shapes`` (:mod:`.dataset`: datasets ``toy_shapes`` and ``toy_prompts``), ``toy_oracle``
(:mod:`.metrics`: metric ``toy_oracle`` and ``clip_score`` with ``toy: true``) and the
``train-toy`` command (:mod:`.commands`). Modules of this package import each other freely;
no other plugin package imports them.
"""
