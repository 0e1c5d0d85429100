"""The `prompts` asset's markdown preview: the instruction comes first and the id is a prefix."""

from __future__ import annotations

import pandas as pd

from poll_assets.assets.prompts import prompts_preview
from poll_assets.prompt_source import prompt_id


def test_preview_puts_the_instruction_first_and_shortens_the_id():
    texts = [f"Write poem number {i} about the sea." for i in range(7)]
    rows = pd.DataFrame({"prompt_id": [prompt_id(t) for t in texts], "instruction": texts, "source_row": range(7)})
    lines = prompts_preview(rows).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "instruction" and "id" in header and "prompt_id" not in header
    assert len(lines) == 2 + 5  # header, rule, the first five prompts
    first = [c.strip() for c in lines[2].strip("|").split("|")]
    assert first[0] == texts[0]
    assert first[header.index("id")] == prompt_id(texts[0])[:10]
    assert prompt_id(texts[0]) not in prompts_preview(rows)
