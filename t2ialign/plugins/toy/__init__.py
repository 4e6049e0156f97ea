"""Built-in toy plugins."""
