"""Built-in plugins of t2ialign.

They are registered through the ``t2ialign`` entry-point group of this distribution (see
``pyproject.toml``), the same way third-party plugins are. :data:`BUILTIN_PLUGINS` mirrors that
table for running from a source tree without installed metadata; a test keeps the two equal.
:data:`BUILTIN_COMMANDS` does the same for the light command modules of the group
``t2ialign.commands`` (named after the plugin whose commands they are).
"""

BUILTIN_PLUGINS: dict[str, str] = {
    "stable_diffusion": "t2ialign.plugins.backbones.stable_diffusion",
    "stable_diffusion_xl": "t2ialign.plugins.backbones.stable_diffusion_xl",
    "stable_diffusion_3": "t2ialign.plugins.backbones.stable_diffusion_3",
    "unet_attention": "t2ialign.plugins.extractors.unet",
    "mmdit_attention": "t2ialign.plugins.extractors.mmdit",
    "weightings": "t2ialign.plugins.weightings",
    "voc": "t2ialign.plugins.datasets.voc",
    "pascal_context": "t2ialign.plugins.datasets.pascal_context",
    "coco_object": "t2ialign.plugins.datasets.coco_object",
    "ade20k": "t2ialign.plugins.datasets.ade20k",
    "toy_shapes": "t2ialign.plugins.toy.dataset",
    "segmentation_metrics": "t2ialign.plugins.metrics.segmentation",
    "toy_training": "t2ialign.plugins.toy.commands",
    "segmentation": "t2ialign.plugins.tasks.segmentation",
    "generation": "t2ialign.plugins.tasks.generation",
    "editing": "t2ialign.plugins.tasks.editing",
    "phrases": "t2ialign.plugins.phrases",
    "prompt_sets": "t2ialign.plugins.datasets.prompt_sets",
    "clip_score": "t2ialign.plugins.metrics.clip_score",
    "toy_oracle": "t2ialign.plugins.toy.metrics",
}

BUILTIN_COMMANDS: dict[str, str] = {
    "segmentation": "t2ialign.plugins.tasks.segmentation_commands",
    "generation": "t2ialign.plugins.tasks.generation_commands",
    "editing": "t2ialign.plugins.tasks.editing_commands",
    "toy_training": "t2ialign.plugins.toy.commands",
}
