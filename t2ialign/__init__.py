"""t2ialign: read and repair pixel-level text-image alignment inside diffusion models.

The host (:mod:`t2ialign.core`) knows the ELBO-T2IAlign method; built-in and third-party
plugins (:mod:`t2ialign.plugins`, entry-point group ``t2ialign``) know models, datasets, metrics
and tasks. Start with :class:`t2ialign.core.host.Host` or the ``t2ialign`` command.
"""

__version__ = "0.1.0"
