"""t2ialign-flux adds no command of its own; this light module says so to the CLI.

A distribution that declares an entry in the ``t2ialign.commands`` group tells ``t2ialign`` where
its commands are, so ``t2ialign --help`` never imports its backbone modules (which import torch and
diffusers) to look for any: help stays instant with the extension installed. A package with
commands would implement ``t2ialign_add_commands`` here, importing heavy modules inside handlers.
"""
