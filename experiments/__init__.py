"""Launchable experiments: each imports a base config and overrides a few fields."""
