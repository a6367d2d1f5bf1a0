"""Device plugins: a user's Python class serving port or MMIO ranges, in a process of its own (docs/plugins.md)."""
