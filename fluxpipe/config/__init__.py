"""Typed settings: the pipeline's config file, the dataset TOML and the reference trainer's flags (torch-free)."""
