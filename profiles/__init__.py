"""Hardware profiles (read through importlib.resources)."""
