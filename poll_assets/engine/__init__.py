"""The stage machinery: what every stage of `assets/` runs on (one step per LLM stage, shards, checks, metadata)."""
