"""The host: hook contract, plugin manager, registry, configs, and the method's core pieces."""
