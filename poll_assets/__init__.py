"""poll-assets: preference datasets judged by a Panel of LLM evaluators, as Dagster assets."""
