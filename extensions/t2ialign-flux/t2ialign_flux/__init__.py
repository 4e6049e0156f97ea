"""t2ialign-flux: FLUX.1 and PixArt-Sigma backbones for t2ialign, as a third-party extension package.

Everything here reaches t2ialign only through its public plugin contract: the modules below are
declared under the ``t2ialign`` entry-point group in this package's ``pyproject.toml`` and found by
t2ialign's plugin manager like any other plugin (``t2ialign plugins`` lists them with this
distribution's name and version).

- :mod:`t2ialign_flux.schedule`: flow-matching noise level of a timestep index, with the static or
  the resolution-dependent ("dynamic") shift of diffusers' ``FlowMatchEulerDiscreteScheduler``;
- :mod:`t2ialign_flux.flux`: the ``flux`` backbone (``FluxPipeline`` folders);
- :mod:`t2ialign_flux.extractor`: ``flux_attention``, capture through the Flux attention processors
  of the double- and single-stream blocks;
- :mod:`t2ialign_flux.registry`: the registry file with ready entries (``flux-dev``, ``flux-schnell``...).
"""

__version__ = "0.1.0"
