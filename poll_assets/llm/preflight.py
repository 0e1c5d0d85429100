"""Is every member of a run ready to call its provider? Checked before the run's first paid call.

`offline_problems` needs no network: each member's key (by the registry's key rule), its base URL
where the provider needs one, and an in-process model's weights file. `model_checks` then asks the
providers that can say for free (OpenAI and OpenAI-compatible servers, Anthropic) about each model:

- `GET /v1/models/{id}` first, about the one model. Only a definite "no such model" (a 404 whose
  body names the id, or OpenAI's `model_not_found` code) or a refused key (401/403) refuses the
  member. An alias (`claude-3-5-haiku-latest`, Ollama's `llama3.1`) resolves there.
- Where that route is absent (a 404 naming nothing, a 405) or says nothing else, `GET /v1/models`
  is evidence only: a model missing from the list is a WARNING naming the closest listed ids, never
  a refusal (lists leave out aliases, wildcard routes and gateways' other models).

Both are bounded by a short timeout; a provider that cannot answer (timeout, no route) is skipped.
`preflight` runs both, raises `PreflightError` naming EVERY member that is not ready, and returns
the warnings. The first call's own 404 stays fatal (`remote.status_error`).

No message holds a key: only variable names, and base URLs without user info or query.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import difflib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from poll_assets.llm.providers.registry import provider_spec
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
# A retriever asks about one model (base_url, key, model, timeout): True when served, False on a
# definite "no such model", None when it cannot say (no per-model route, an unexpected answer).
# Both raise ModelListDenied when the endpoint refuses the key itself (HTTP 401/403).
Lister = Callable[[str | None, str | None, float], "list[str] | None"]
Retriever = Callable[[str | None, str | None, str, float], "bool | None"]


class ModelListDenied(Exception):
    pass


def names_the_model(status: int, body: object, model: str) -> bool:
    """Whether an error answer about `GET /v1/models/{model}` is a definite "no such model": a 404
    whose body names the id (OpenAI, Anthropic, Ollama) or carries OpenAI's `model_not_found` code.
    A 404 naming nothing (FastAPI's {"detail": "Not Found"}: vLLM has no such route) is not one."""
    if status != 404:
        return False
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        if err.get("code") == "model_not_found":
            return True
        err = err.get("message", "")
    return isinstance(err, str) and model in err


def _error_body(exc: object) -> object:
    response = getattr(exc, "response", None)
    try:
        return response.json() if response is not None else None
    except ValueError:
        return None


def _retrieve_openai(base_url: str | None, key: str | None, model: str, timeout_s: float) -> bool | None:
    import openai

    from poll_assets.llm.providers.openai_api import NO_KEY_PLACEHOLDER

    client = openai.OpenAI(api_key=key or NO_KEY_PLACEHOLDER, base_url=base_url or None, timeout=timeout_s, max_retries=0)
    try:
        client.models.retrieve(model)
        return True
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        raise ModelListDenied from exc
    except openai.APIStatusError as exc:
        return False if names_the_model(exc.status_code, _error_body(exc), model) else None
    except (openai.APIError, ValueError, TypeError):
        return None
    finally:
        client.close()


def _retrieve_anthropic(base_url: str | None, key: str | None, model: str, timeout_s: float) -> bool | None:
    import anthropic

    client = anthropic.Anthropic(api_key=key, base_url=base_url or None, timeout=timeout_s, max_retries=0)
    try:
        client.models.retrieve(model)
        return True
    except (anthropic.AuthenticationError, anthropic.PermissionDeniedError) as exc:
        raise ModelListDenied from exc
    except anthropic.APIStatusError as exc:
        return False if names_the_model(exc.status_code, _error_body(exc), model) else None
    except (anthropic.APIError, ValueError, TypeError):
        return None
    finally:
        client.close()


def _list_openai(base_url: str | None, key: str | None, timeout_s: float) -> list[str] | None:
    import openai

    from poll_assets.llm.providers.openai_api import NO_KEY_PLACEHOLDER

    client = openai.OpenAI(api_key=key or NO_KEY_PLACEHOLDER, base_url=base_url or None, timeout=timeout_s, max_retries=0)
    try:
        return [m.id for m in client.models.list().data]
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
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
    except (anthropic.AuthenticationError, anthropic.PermissionDeniedError) as exc:
        raise ModelListDenied from exc
    except (anthropic.APIError, ValueError, TypeError):
        return None
    finally:
        client.close()


LISTERS: dict[str, Lister] = {"openai": _list_openai, "openai_compatible": _list_openai, "anthropic": _list_anthropic}
RETRIEVERS: dict[str, Retriever] = {"openai": _retrieve_openai, "openai_compatible": _retrieve_openai,
                                    "anthropic": _retrieve_anthropic}


def closest_ids(model: str, served: Sequence[str], n: int = 5) -> list[str]:
    """The listed ids nearest to `model` (an alias's dated form, a tag's base name), else the first few."""
    near = difflib.get_close_matches(model, served, n=n, cutoff=0.3)
    prefix = [s for s in served if s.startswith(model) or model.startswith(s)]
    found = list(dict.fromkeys([*prefix, *near]))[:n]
    return found or sorted(served)[:n]


@dataclass(frozen=True)
class _Evidence:
    found: bool | None  # what GET /v1/models/{id} said
    served: list[str] | None  # what GET /v1/models listed (asked only when the first did not say "served")


def _evidence(m: PreflightMember, key: str | None, timeout_s: float, lister: Lister | None,
              retriever: Retriever | None) -> _Evidence:
    found = None
    if retriever is not None:
        try:
            found = retriever(m.base_url, key, m.model, timeout_s)
        except ModelListDenied:
            raise
        except Exception:  # noqa: BLE001 - an optional check never fails a run by itself
            found = None
    if found or lister is None:
        return _Evidence(found, None)
    try:
        served = lister(m.base_url, key, timeout_s)
    except ModelListDenied:
        if found is False:
            return _Evidence(found, None)
        raise
    except Exception:  # noqa: BLE001
        served = None
    return _Evidence(found, served)


def _model_check(m: PreflightMember, environ: Mapping[str, str], timeout_s: float, listers: Mapping[str, Lister],
                 retrievers: Mapping[str, Retriever]) -> tuple[NotReady | None, NotReady | None]:
    """(a refusal, a warning) for one member's model; both None when nothing is wrong or nothing can be said."""
    lister, retriever = listers.get(m.provider), retrievers.get(m.provider)
    # Azure OpenAI lists base models while requests name deployments: a miss there proves nothing.
    if (lister is None and retriever is None) or (urlsplit(m.base_url or "").hostname or "").endswith(".azure.com"):
        return None, None
    key = environ.get(m.key_env or "", "").strip() or None
    where = safe_url(m.base_url) or "the provider's default endpoint"
    try:
        seen = _evidence(m, key, timeout_s, lister, retriever)
    except ModelListDenied:
        return NotReady(m.name, m.provider, f"{where} refused the key in {m.key_env} (HTTP 401/403 asking about models)",
                        f"Check that {m.key_env} holds a valid key for this provider."), None
    near = scrub(", ".join(closest_ids(m.model, seen.served))) if seen.served else ""
    if seen.found is False:
        hint = f" (it lists e.g. {near})" if near else ""
        return NotReady(m.name, m.provider, f"model {m.model!r} does not exist at {where} "
                        f"(HTTP 404 for GET /v1/models/{m.model}){hint}",
                        "Fix `model` (an id or alias the provider serves) or `base_url`."), None
    if seen.found or seen.served is None or m.model in seen.served:
        return None, None
    return None, NotReady(m.name, m.provider, f"model {m.model!r} is not in the model list of {where} "
                          f"(closest listed: {near or 'none'}); the run goes on, as lists leave out aliases and routed names",
                          "If the first call answers 404, fix `model`.")


def model_checks(members: Sequence[PreflightMember], environ: Mapping[str, str], *, timeout_s: float = LIST_TIMEOUT_S,
                 listers: Mapping[str, Lister] | None = None,
                 retrievers: Mapping[str, Retriever] | None = None) -> tuple[list[NotReady], list[NotReady]]:
    """(refusals, warnings) for members whose provider can say whether it serves their model. All
    members are asked at once, each question bounded by `timeout_s`. Stub `listers` given without
    `retrievers` mean no per-model question is asked."""
    if retrievers is None:
        retrievers = RETRIEVERS if listers is None else {}
    listers = LISTERS if listers is None else listers
    asked = [m for m in members if m.provider in listers or m.provider in retrievers]
    if not asked:
        return [], []
    with ThreadPoolExecutor(max_workers=min(8, len(asked))) as pool:
        found = list(pool.map(lambda m: _model_check(m, environ, timeout_s, listers, retrievers), asked))
    return [p for p, _ in found if p is not None], [w for _, w in found if w is not None]


def model_problems(members: Sequence[PreflightMember], environ: Mapping[str, str], *,
                   timeout_s: float = LIST_TIMEOUT_S, listers: Mapping[str, Lister] | None = None,
                   retrievers: Mapping[str, Retriever] | None = None) -> list[NotReady]:
    """The refusals of `model_checks` (members whose model the provider definitely does not serve, or
    whose key it refused)."""
    return model_checks(members, environ, timeout_s=timeout_s, listers=listers, retrievers=retrievers)[0]


def preflight(members: Sequence[PreflightMember], environ: Mapping[str, str], *, check_models: bool = True,
              timeout_s: float = LIST_TIMEOUT_S, listers: Mapping[str, Lister] | None = None,
              retrievers: Mapping[str, Retriever] | None = None) -> list[NotReady]:
    """Raise PreflightError naming every member that is not ready; return the warnings (models a
    list left out). The models are only asked about when every member passed the offline checks, so
    a run with a missing key makes no request at all."""
    problems, warnings = offline_problems(members, environ), []
    if not problems and check_models:
        problems, warnings = model_checks(members, environ, timeout_s=timeout_s, listers=listers, retrievers=retrievers)
    if problems:
        raise PreflightError(problems, len(members))
    return warnings
