"""LLM access: one call interface, several providers, one call pipeline."""
