"""The code location. The panel is chosen with POLL_PANEL (a bundled name or a YAML path)."""

from poll_assets.panel import load_panel
from poll_assets.pipeline import build_definitions

defs = build_definitions(*load_panel())
