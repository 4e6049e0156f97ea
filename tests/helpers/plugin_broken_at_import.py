"""A "third-party plugin" whose import fails: the host must record it and carry on without it.

Never imported by the test suite directly; ``tests/test_robustness.py`` points a fake entry point
at it.
"""

raise RuntimeError("this plugin is broken on purpose (import-time failure)")
