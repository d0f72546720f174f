"""Experiment configs: one `get_config()` per file, each a complete `ml_collections.ConfigDict`."""
