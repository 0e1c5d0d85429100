"""MkDocs hook: the panel page's `<!-- panel-reference -->` marker becomes the reference generated
from the panel's pydantic models (`poll_assets.panel_reference`), at every build."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- panel-reference -->"
PAGE = "panel.md"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} lost its {MARKER} marker: the generated panel reference has nowhere to go")
    if str(ROOT) not in sys.path:  # a checkout that is not installed still builds its own docs
        sys.path.insert(0, str(ROOT))
    from poll_assets.panel_reference import panel_reference_markdown

    return markdown.replace(MARKER, panel_reference_markdown())
