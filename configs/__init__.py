"""Shipped YAML configs (read through importlib.resources)."""
