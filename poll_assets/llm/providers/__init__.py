"""The providers: one backend module each, and the registry that names them (registry.py)."""
