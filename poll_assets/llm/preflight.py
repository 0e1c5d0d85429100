"""Is every member of a run ready to call its provider? Checked before the run's first paid call.

`offline_problems` needs no network: each member's key (by the registry's key rule), its base URL
where the provider needs one, and an in-process model's weights file. `model_problems` then asks
the providers that list their models for free (OpenAI and OpenAI-compatible servers, Anthropic:
`GET /v1/models`, through their SDKs) whether the model exists; it is bounded by a short timeout,
and a provider that cannot list (no such route, no permission, timeout) is skipped, never failed.
`preflight` runs both and raises `PreflightError` naming EVERY member that is not ready.

No message holds a key: only variable names, and base URLs without user info or query.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from poll_assets.llm.providers import provider_spec
from poll_assets.llm.redact import safe_url, scrub
from poll_assets.llm.resources import MemberConnection

LIST_TIMEOUT_S = 5.0


class PreflightMember(MemberConnection, Protocol):
    """What the preflight reads from a panel member (`poll_assets.panel.Member` has it): its
    connection, and whether it named its key variable (`key_env` is the one read, named or default)."""

    @property
    def api_key_env(self) -> str | None: ...


@dataclass(frozen=True)
class NotReady:
    """One reason one member cannot run: which setting (`what`) and what to do about it."""

    member: str
    provider: str
    what: str
    fix: str

    def line(self) -> str:
        return f"- {self.member} ({self.provider}): {self.what}. {self.fix}"


class PreflightError(RuntimeError):
    def __init__(self, problems: Sequence[NotReady], n_members: int):
        names = list(dict.fromkeys(p.member for p in problems))  # panel order
        super().__init__(
            f"{len(names)} of {n_members} panel members of this run are not ready ({', '.join(names)}); "
            "no call was made:\n" + "\n".join(p.line() for p in problems)
        )
        self.problems = list(problems)
        self.members = names


def _key_problem(m: PreflightMember, environ: Mapping[str, str]) -> NotReady | None:
    spec = provider_spec(m.provider)
    if not spec.key_required(named=bool(m.api_key_env)):
        return None
    var = m.key_env
    if var and environ.get(var, "").strip():
        return None
    what = f"environment variable {var} is not set or empty" if var else "no key variable is named"
    return NotReady(m.name, m.provider, what,
                    f"Put `{var or 'MY_KEY'}=...` in the project's .env file (read by `dagster dev`) or export it, "
                    "or name another variable with `api_key_env`.")


def _base_url_problem(m: PreflightMember) -> NotReady | None:
    if not m.base_url:
        if provider_spec(m.provider).needs_base_url:
            return NotReady(m.name, m.provider, "base_url is missing",
                            "Set `base_url` to the server's OpenAI route, e.g. http://localhost:8000/v1.")
        return None
    parts = urlsplit(m.base_url)
    if parts.scheme in ("http", "https") and parts.hostname:
        return None
    return NotReady(m.name, m.provider, f"base_url {safe_url(m.base_url)!r} is not an http(s) URL with a host",
                    "Give a full URL such as http://localhost:8000/v1.")


def _weights_problem(m: PreflightMember) -> NotReady | None:
    if not provider_spec(m.provider).in_process or not m.model_path or Path(m.model_path).is_file():
        return None
    return NotReady(m.name, m.provider, f"model_path {m.model_path} is not a file",
                    "Point `model_path` at a GGUF file, or drop it to use the bundled model.")


def offline_problems(members: Sequence[PreflightMember], environ: Mapping[str, str]) -> list[NotReady]:
    """Every problem that can be seen without a network call, in member order."""
    found = []
    for m in members:
        found += [p for p in (_key_problem(m, environ), _base_url_problem(m), _weights_problem(m)) if p]
    return found


# A lister returns the model ids an endpoint serves, or None when it cannot say (the check is skipped).
# It raises ModelListDenied when the endpoint refuses the key itself (HTTP 401).
Lister = Callable[[str | None, str | None, float], "list[str] | None"]


class ModelListDenied(Exception):
    pass


def _list_openai(base_url: str | None, key: str | None, timeout_s: float) -> list[str] | None:
    import openai

    from poll_assets.llm.openai_api import NO_KEY_PLACEHOLDER

    client = openai.OpenAI(api_key=key or NO_KEY_PLACEHOLDER, base_url=base_url or None, timeout=timeout_s, max_retries=0)
    try:
        return [m.id for m in client.models.list().data]
    except openai.AuthenticationError as exc:
        raise ModelListDenied from exc
    except (openai.APIError, ValueError, TypeError):
        return None  # no such route, no permission to list, timeout, an unexpected body: cannot say
    finally:
        client.close()


def _list_anthropic(base_url: str | None, key: str | None, timeout_s: float) -> list[str] | None:
    import anthropic

    client = anthropic.Anthropic(api_key=key, base_url=base_url or None, timeout=timeout_s, max_retries=0)
    try:
        page = client.models.list(limit=1000)
        ids = [m.id for m in page.data]
        return None if page.has_more else ids  # a model on a later page: cannot say, so do not fail
    except anthropic.AuthenticationError as exc:
        raise ModelListDenied from exc
    except (anthropic.APIError, ValueError, TypeError):
        return None
    finally:
        client.close()


LISTERS: dict[str, Lister] = {"openai": _list_openai, "openai_compatible": _list_openai, "anthropic": _list_anthropic}


def _model_problem(m: PreflightMember, environ: Mapping[str, str], timeout_s: float,
                   listers: Mapping[str, Lister]) -> NotReady | None:
    lister = listers.get(m.provider)
    # Azure OpenAI lists base models while requests name deployments: a miss there proves nothing.
    if lister is None or (urlsplit(m.base_url or "").hostname or "").endswith(".azure.com"):
        return None
    key = environ.get(m.key_env or "", "").strip() or None
    where = safe_url(m.base_url) or "the provider's default endpoint"
    try:
        served = lister(m.base_url, key, timeout_s)
    except ModelListDenied:
        return NotReady(m.name, m.provider, f"{where} refused the key in {m.key_env} (HTTP 401 listing models)",
                        f"Check that {m.key_env} holds a valid key for this provider.")
    except Exception:  # noqa: BLE001 - an optional check never fails a run by itself
        return None
    if served is None or m.model in served:
        return None
    known = scrub(", ".join(sorted(served)[:8])) or "none"
    return NotReady(m.name, m.provider, f"model {m.model!r} is not among the models {where} serves (e.g. {known})",
                    "Fix `model` (the exact id the endpoint lists) or `base_url`.")


def model_problems(members: Sequence[PreflightMember], environ: Mapping[str, str], *,
                   timeout_s: float = LIST_TIMEOUT_S, listers: Mapping[str, Lister] | None = None) -> list[NotReady]:
    """For members whose provider lists its models: those whose model is not listed (or whose key
    the listing refused). All members are asked at once; each listing is bounded by `timeout_s`."""
    listers = LISTERS if listers is None else listers
    asked = [m for m in members if m.provider in listers]
    if not asked:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(asked))) as pool:
        found = list(pool.map(lambda m: _model_problem(m, environ, timeout_s, listers), asked))
    return [p for p in found if p is not None]


def preflight(members: Sequence[PreflightMember], environ: Mapping[str, str], *, check_models: bool = True,
              timeout_s: float = LIST_TIMEOUT_S, listers: Mapping[str, Lister] | None = None) -> None:
    """Raise PreflightError naming every member that is not ready. The models are only asked about
    when every member passed the offline checks, so a run with a missing key makes no request at all."""
    problems = offline_problems(members, environ)
    if not problems and check_models:
        problems = model_problems(members, environ, timeout_s=timeout_s, listers=listers)
    if problems:
        raise PreflightError(problems, len(members))
