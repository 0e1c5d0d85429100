"""The call layer as Dagster resources: one `ChatModelResource` per panel member, and the response cache.

A resource carries only a member's connection settings (provider, model, endpoint, key); how its
calls are paced is the member's `CallPolicy`, which `pipeline.run_settings` resolves from the panel.
Keys come from the environment through `dg.EnvVar` and never appear in repr, logs or messages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Protocol

import dagster as dg
from pydantic import Field, PrivateAttr

from poll_assets.llm.base import BackendConfig, ChatBackend
from poll_assets.llm.cache.response_cache import CacheMode, ResponseCache, default_cache_path
from poll_assets.llm.providers.registry import provider_spec


class MissingAPIKeyError(RuntimeError):
    """A panel member needs a key and its environment variable is unset or empty."""

    def __init__(self, member: str, provider: str, env_var: str):
        super().__init__(
            f"panel member {member!r} (provider {provider!r}) needs an API key: environment variable "
            f"{env_var} is not set or empty. Put `{env_var}=...` in the project's .env file (read by "
            f"`dagster dev`) or export it, or point the member at another variable with `api_key_env`."
        )
        self.member = member
        self.env_var = env_var


class ChatModelResource(dg.ConfigurableResource):
    """One member's model behind its provider. The backend (the SDK client) is built once, through
    the provider registry, and reused for every call."""

    provider: str
    member: str
    model: str
    base_url: str | None = None
    api_key: str | None = Field(default=None, repr=False)  # resolved secret: kept out of repr/str
    api_key_env: str | None = None  # the variable's name, for error messages (never the value)
    model_path: str | None = None  # in-process providers: the weights file
    n_ctx: int = 4096

    _backend: ChatBackend | None = PrivateAttr(default=None)

    def _key_value(self) -> str | None:
        # Inside a run Dagster has already resolved the EnvVar; a resource used directly (scripts,
        # tests) still holds the EnvVar itself, which must be read explicitly.
        if isinstance(self.api_key, dg.EnvVar):
            return self.api_key.get_value() or None
        return self.api_key or None

    def _checked_key(self) -> str | None:
        key = self._key_value()
        # A member that named a variable meant to send a key, even where the provider needs none.
        if not key and provider_spec(self.provider).key_required(named=bool(self.api_key_env)):
            raise MissingAPIKeyError(self.member, self.provider, self.api_key_env or "<api_key_env>")
        return key

    def backend(self) -> ChatBackend:
        if self._backend is None:
            spec = provider_spec(self.provider)
            if spec.needs_base_url and not self.base_url:
                raise ValueError(f"panel member {self.member!r}: provider {self.provider!r} needs a base_url")
            config = BackendConfig(
                provider=self.provider, model=self.model, member=self.member, base_url=self.base_url,
                api_key=self._checked_key(), key_env=self.api_key_env, model_path=self.model_path, n_ctx=self.n_ctx,
            )
            self._backend = spec.backend_class().from_config(config)
        return self._backend


def member_backend(resource: ChatModelResource | ChatBackend) -> ChatBackend:
    """The backend bound to a member's resource key. Tests bind a ChatBackend there directly
    (`build_definitions(resource_overrides=...)`); a run binds the member's ChatModelResource."""
    return resource if isinstance(resource, ChatBackend) else resource.backend()


class MemberConnection(Protocol):
    """What a resource needs from a panel member (`poll_assets.panel.Member` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def provider(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def base_url(self) -> str | None: ...
    @property
    def key_env(self) -> str | None: ...
    @property
    def model_path(self) -> str | None: ...
    @property
    def n_ctx(self) -> int: ...


def resource_key(member: MemberConnection) -> str:
    return f"llm_{member.name}"


def build_llm_resource(member: MemberConnection) -> ChatModelResource:
    """The resource for one panel member; keys come from the environment through EnvVar.

    The backend's module (and so the provider's SDK: `import anthropic` alone takes 2-4 s of CPU here)
    is imported when a stage step first needs the member's client, which is never on a re-run the
    response cache serves whole, and always before any member of the stage sends (engine/stage.py).
    """
    spec = provider_spec(member.provider)
    kwargs: dict[str, object] = {
        "provider": member.provider, "member": member.name, "model": member.model, "base_url": member.base_url,
    }
    if spec.in_process:
        kwargs.update(model_path=member.model_path, n_ctx=member.n_ctx)
    elif member.key_env:
        kwargs["api_key_env"] = member.key_env
        # Dagster resolves an unset EnvVar into a config error at run launch that names the resource
        # key but not the member, and with a long stack trace. So the EnvVar is passed only when the
        # variable is set here; otherwise api_key stays None, and the run's preflight (the first thing
        # every LLM stage step does, `engine/preflight_step.py`) fails naming every member without a
        # key. Definitions are loaded again in the run worker, so this sees the run's environment.
        if os.environ.get(member.key_env):
            kwargs["api_key"] = dg.EnvVar(member.key_env)
    return ChatModelResource(**kwargs)


CacheBackend = Literal["sqlite", "postgres", "instance"]


class ResponseCacheResource(dg.ConfigurableResource):
    """The response cache as a Dagster resource, in one of three places (`backend`):

    - "sqlite": the file `path`, by default $DAGSTER_HOME/llm_cache.sqlite (one machine);
    - "postgres": the database at `url` (an EnvVar when it holds a password);
    - "instance": the Dagster instance's own PostgreSQL database (deploy/dagster.yaml), so every
      worker that can reach the instance shares the cache with no setting of its own.
    """

    path: str | None = None
    mode: CacheMode = "use"
    backend: CacheBackend = "sqlite"
    url: str | None = Field(default=None, repr=False)  # may carry a password: kept out of repr

    _cache: ResponseCache | None = PrivateAttr(default=None)
    _instance_url: str | None = PrivateAttr(default=None)

    def resolved_path(self) -> Path:
        return Path(self.path).expanduser() if self.path else default_cache_path()

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if self.backend == "instance" and context.instance is not None:
            from poll_assets.llm.cache.postgres import instance_database_url

            self._instance_url = instance_database_url(context.instance)

    def location(self) -> str:
        """Where the cache lives: a SQLite file path or a PostgreSQL URL."""
        if self.backend == "sqlite":
            return str(self.resolved_path())
        if self.backend == "postgres":
            url = self.url.get_value() if isinstance(self.url, dg.EnvVar) else self.url
            if not url:
                raise ValueError("response cache: backend 'postgres' needs a URL (panel `cache: {url_env: VAR}`), and it is empty")
            return url
        if self._instance_url is None:  # outside a run: the instance DAGSTER_HOME names
            from poll_assets.llm.cache.postgres import instance_database_url

            self._instance_url = instance_database_url(dg.DagsterInstance.get())
        return self._instance_url

    def get_cache(self) -> ResponseCache:
        if self._cache is None:
            self._cache = ResponseCache(self.location(), self.mode)
        return self._cache


class CacheConfig(Protocol):
    """The panel's cache settings (`poll_assets.panel.CacheSettings` has them)."""

    @property
    def mode(self) -> CacheMode: ...
    @property
    def path(self) -> str | None: ...
    @property
    def url(self) -> str | None: ...
    @property
    def url_env(self) -> str | None: ...
    @property
    def resolved_backend(self) -> str: ...


def build_cache_resource(settings: CacheConfig, cache_path: str | None = None) -> ResponseCacheResource:
    """The cache resource for the panel's settings; `cache_path` (a SQLite file) overrides the
    panel's path when the panel keeps the default SQLite backend. A URL held in a variable is passed
    as an EnvVar, so it never appears in the run's config."""
    backend = settings.resolved_backend
    if backend == "sqlite":
        return ResponseCacheResource(path=cache_path or settings.path or str(default_cache_path()), mode=settings.mode)
    url: str | dg.EnvVar | None = settings.url
    if settings.url_env:
        if not os.environ.get(settings.url_env):
            raise ValueError(f"panel cache.url_env: environment variable {settings.url_env} is not set or empty; "
                             "it should hold the cache's postgresql:// URL")
        url = dg.EnvVar(settings.url_env)
    return ResponseCacheResource(backend=backend, url=url, mode=settings.mode)  # type: ignore[arg-type]
