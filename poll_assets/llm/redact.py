"""What a message may say about a request: credentials scrubbed, base URLs without secrets.

Its own module (no SDK, no HTTP client) because the preflight needs it at definitions load."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# Token-looking strings that must not reach a message even if they are not *our* key
# (a proxy may echo a header back, or a key from another variable may show up).
_TOKEN_PATTERNS = [
    re.compile(r"(?i)\bbearer\s+[^\s,;\"']+"),
    re.compile(r"(?i)(x-api-key|api-key|api_key|authorization)([\"']?\s*[:=]\s*[\"']?)[^\s,;\"'}]+"),
    re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}"),
    re.compile(r"\bhf_[A-Za-z0-9]{6,}"),
]
_MAX_DETAIL = 300


def scrub(text: str, secrets: tuple[str | None, ...] = ()) -> str:
    """`text` with every given secret and anything shaped like a credential replaced by ***."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    for pattern in _TOKEN_PATTERNS:
        if pattern.groups >= 2:
            text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
        else:
            text = pattern.sub("***", text)
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def safe_url(url: str | None) -> str | None:
    """A base URL fit for a message: no user:password part, no query string (either may hold a token)."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable base_url>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
