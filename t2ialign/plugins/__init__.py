"""Built-in plugins of t2ialign.

They are registered through the ``t2ialign`` entry-point group of this distribution (see
``pyproject.toml``), the same way third-party plugins are. :data:`BUILTIN_PLUGINS` mirrors that
table for running from a source tree without installed metadata; a test keeps the two equal.
"""

BUILTIN_PLUGINS: dict[str, str] = {
}
