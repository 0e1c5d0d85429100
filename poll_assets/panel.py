"""The panel config: one YAML file naming the prompt source, the generators, the judges and
how verdicts are pooled and binarized. Validated when the code location loads."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from poll_assets.scoring.binarize import Strategy
from poll_assets.code_versions import member_version
from poll_assets.llm.base import GenerationParams
from poll_assets.llm.batch.settings import BatchSettings
from poll_assets.llm.budget import BudgetSettings
from poll_assets.llm.cache.response_cache import PG_URL_PREFIXES, CacheMode
from poll_assets.llm.online.policy import Limits
from poll_assets.llm.pricing import Price
from poll_assets.llm.providers.registry import PROVIDER_NAMES, provider_spec
from poll_assets.pairwise import comparisons_per_prompt
from poll_assets.scoring.pooled_ratings import PoolingMethod
from poll_assets.rubrics.ultrafeedback import RUBRICS
from poll_assets.shard_cost import IN_PROCESS_CALL_S, REMOTE_CALL_S, MemberLoad, ShardShape, default_shard_size, events_per_shard

PANEL_ENV_VAR = "POLL_PANEL"
PANELS_DIR = Path(__file__).parent / "panels"
DEFAULT_PANEL = "local"

# The registry's provider names, so an unknown one is refused with the list of known ones.
Provider = Literal[PROVIDER_NAMES]  # type: ignore[valid-type]
Aspect = Literal[tuple(RUBRICS)]  # type: ignore[valid-type]  # the aspects are the rubrics there are

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class PanelConfigError(ValueError):
    """A panel file that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Params(_Strict):
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="Sampling temperature; None leaves the provider's default.")
    max_new_tokens: int = Field(default=512, ge=1, le=32768, description="Most tokens one answer may have; also the estimate's output bound before any answer is cached.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling; None leaves the provider's default.")
    stop: list[str] = Field(default_factory=list, description="Strings that end an answer.")
    seed: int | None = Field(default=None, description="Sampling seed, for providers that honour one.")

    def to_generation_params(self) -> GenerationParams:
        return GenerationParams(
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            top_p=self.top_p,
            stop=tuple(self.stop),
            seed=self.seed,
        )


class Member(_Strict):
    """A generator or a judge: one model behind one provider, with its own settings."""

    name: str = Field(description="Lowercase letters, digits and '_'; the asset key (generations/<name>, ratings/<name>), unique across the panel.")
    provider: Provider = Field(description="The provider registry's name: how the member is called.")
    model: str = Field(description="The model id as the provider (or the self-hosted server) names it; also the key of its price in `prices`.")
    family: str = Field(description="The model family, for the self-preference control (a judge's ratings of its own family are left out of pooling).")
    system_prompt: str | None = Field(default=None, description="A system message sent before every prompt; None sends none.")
    params: Params = Field(default_factory=Params, description="Generation parameters, sent with every call.")
    limits: Limits = Field(default_factory=Limits, description="How many calls at once, how fast, and how long they are retried.")
    base_url: str | None = Field(default=None, description="A self-hosted server or a dedicated endpoint; openai_compatible needs one.")
    api_key_env: str | None = Field(default=None, description="The environment variable holding the key; default per provider (OPENAI_API_KEY, ANTHROPIC_API_KEY, HF_TOKEN).")
    model_path: str | None = Field(default=None, description="In-process providers (local) only: a GGUF file; default is the bundled SmolLM2-135M-Instruct.")
    n_ctx: int = Field(default=4096, ge=256, description="In-process providers (local) only: the model's context size in tokens.")
    context_tokens: int | None = Field(default=None, ge=256, description="A judge's context window in tokens: a longer judge prompt has its generations cut to fit (marked, and listed in `truncated_texts`) instead of being refused. Default: n_ctx for in-process models, none for remote ones.")
    pool: str | None = Field(default=None, description="The Dagster pool of this member's step; default llm_<provider>.")
    batch: BatchSettings = Field(default_factory=BatchSettings, description="Send the calls through the provider's batch API instead of online (openai, anthropic; openai_compatible on declaration).")
    source_column: str | None = Field(default=None, description=(
        "Provider dataset only: the prompt source's column holding this generator's answers; no call is made."))

    @field_validator("name")
    @classmethod
    def _name_is_key_safe(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} must be lowercase letters, digits and '_', starting with a letter")
        return v

    @model_validator(mode="after")
    def _params_supported(self) -> "Member":
        spec = provider_spec(self.provider)
        unsupported = self.params.to_generation_params().set_fields() - spec.params
        if unsupported:
            raise ValueError(
                f"params {sorted(unsupported)} are not supported by provider {self.provider!r} "
                f"(it supports {sorted(spec.params)})"
            )
        if self.model_path is not None and not spec.in_process:
            in_process = [name for name in PROVIDER_NAMES if provider_spec(name).in_process]
            raise ValueError(f"model_path applies only to provider {' or '.join(map(repr, in_process))}")
        if spec.needs_base_url and not self.base_url:
            raise ValueError(f"provider {self.provider!r} needs a base_url (e.g. http://localhost:8000/v1)")
        refusal = self.batch.refusal(self.name, self.provider)
        if refusal:
            raise ValueError(refusal)
        if (self.provider == "dataset") != (self.source_column is not None):
            raise ValueError("provider 'dataset' takes its answers from `source_column` (a column of the prompt "
                             "source), and only it does: give both or neither")
        return self

    @property
    def key_env(self) -> str | None:
        return self.api_key_env or provider_spec(self.provider).key_env

    @property
    def context_window(self) -> int | None:
        """The tokens a prompt and its answer may take together: `context_tokens`, else n_ctx in process."""
        return self.context_tokens or (self.n_ctx if provider_spec(self.provider).in_process else None)

    @property
    def pool_name(self) -> str:
        return self.pool or f"llm_{self.provider}"

    def fingerprint(self, *extra: str) -> str:
        """Short hash of everything that changes this member's output (its code_version): every
        field but those `code_versions.MEMBER_EXCLUDED` names, and the extra texts."""
        return member_version(self, *extra)


class Source(_Strict):
    """Where prompts come from: a Hub dataset, or local files."""

    repo_id: str | None = Field(default=None, description="A Hugging Face Hub dataset; give this or data_files.")
    data_files: list[str] | None = Field(default=None, description="Local .jsonl/.json, .parquet or .csv files, relative to the panel file's folder; give this or repo_id.")
    split: str = Field(default="train", description="The dataset split to read.")
    revision: str | None = Field(default=None, description="A commit or tag of the Hub dataset, for reproducible data.")
    subset: str | None = Field(default=None, description="The Hub dataset's configuration (subset) name.")
    column_mapping: dict[str, str] = Field(default_factory=dict, description="Source column -> 'instruction': which column holds the prompt.")
    num_examples: int = Field(default=100, ge=1, description="Rows used, from the top; raising it appends shards and leaves the existing ones as they were.")
    shard_size: int | None = Field(default=None, ge=1, description="Rows per shard (partition). Unset: chosen from the panel's shape by the shard cost model (docs/operations.md, 'Shard size'), shown by `poll-assets estimate` and in the prompts asset's metadata; once a dataset exists, write the value down here, since a different default would re-key its shards.")
    shards_per_run: int = Field(default=20, ge=1, description="Shards per run in a backfill (--partitions, --all, Materialize all): their calls overlap, and a run holds at most this many shards' frames in memory.")

    # True when `shard_size` was left unset and the panel chose it (Panel._resolve_shard_size).
    _shard_size_chosen: bool = PrivateAttr(default=False)

    @property
    def shard_size_chosen(self) -> bool:
        """True when the panel left shard_size unset and the shard cost model chose it."""
        return self._shard_size_chosen

    @property
    def shard_size_origin(self) -> str:
        """Where the shard size came from, for messages and metadata."""
        return "default of the shard cost model" if self._shard_size_chosen else "source.shard_size"

    @model_validator(mode="after")
    def _one_source(self) -> "Source":
        if (self.repo_id is None) == (self.data_files is None):
            raise ValueError("give exactly one of repo_id (a Hub dataset) or data_files (local files)")
        if self.column_mapping and "instruction" not in self.column_mapping.values():
            raise ValueError("column_mapping must map some source column to 'instruction'")
        return self

    @property
    def instruction_column(self) -> str:
        for src, dst in self.column_mapping.items():
            if dst == "instruction":
                return src
        return "instruction"


class PairwiseSettings(_Strict):
    """How pairwise judging picks its pairs (docs/pairwise.md)."""

    against: str | None = Field(default=None, description="A generator's name: compare each other generation with this one only (n-1 pairs per prompt); None compares all n(n-1)/2 pairs.")
    both_orders: bool = Field(default=True, description="Ask each pair twice, each answer shown first once, so position bias cancels and is measured; false asks once, the first position drawn by `judging.seed`.")


class Judging(_Strict):
    mode: Literal["rating", "pairwise"] = Field(default="rating", description="rating: each judge rates every answer on the rubric's 1-5 scale in one call; pairwise: each judge compares answers two at a time (see `pairwise`).")
    pairwise: PairwiseSettings = Field(default_factory=PairwiseSettings, description="Mode 'pairwise' only: which pairs are compared, and in which orders.")
    aspect: Aspect = Field(default="instruction-following", description="The UltraFeedback aspect the judges rate.")
    shuffle_positions: bool = Field(default=True, description="Position-bias control: each judge sees a prompt's generations in its own seeded order.")
    exclude_self_family: bool = Field(default=True, description="Self-preference control: a judge's ratings of generations from its own family are left out of pooling.")
    seed: int = Field(default=0, description="Seed of the position shuffle.")
    max_rationale_chars: int | None = Field(default=300, ge=20, description="Longest rationale asked for; None where a provider refuses maxLength in a JSON schema.")
    repair_attempts: int = Field(default=1, ge=0, description="Re-asks of a judge whose answer left texts unread; 0 turns repairs off.")


class Pooling(_Strict):
    method: PoolingMethod = Field(default="mean", description="How a generation's valid ratings are combined: mean (the PoLL paper's), median, majority (a tie falls back to the mean), or weighted (needs `weights`).")
    min_judges: int = Field(default=1, ge=1, description="Fewest valid ratings a generation needs for a pooled rating; below it, None.")
    weights: dict[str, float] | Literal["fit"] | None = Field(default=None, description="Method 'weighted' only: {judge: weight >= 0} naming every judge, or 'fit' (fitted on the gold labels, cross-fitted by prompt folds; needs `gold:`).")
    folds: int = Field(default=5, ge=2, le=50, description="Prompt folds for `weights: fit`: a labelled prompt is pooled with weights fitted on the other folds.")

    @model_validator(mode="after")
    def _weights_with_weighted(self) -> "Pooling":
        if self.method == "weighted" and self.weights is None:
            raise ValueError("method 'weighted' needs `weights`: {judge: weight, ...} or 'fit' (needs `gold:`)")
        if self.method != "weighted" and self.weights is not None:
            raise ValueError(f"`weights` apply to method 'weighted' only, not {self.method!r}")
        if isinstance(self.weights, dict):
            negative = sorted(k for k, w in self.weights.items() if w < 0)
            if negative or not any(w > 0 for w in self.weights.values()):
                raise ValueError(f"weights must be >= 0 with at least one above 0; got {self.weights}")
        return self


class Gold(_Strict):
    """Human labels to calibrate the judges and the jury against (docs/calibration.md)."""

    path: str = Field(description="The gold label file (.jsonl, .csv or .parquet): relative to the panel file, or any UPath (s3://...).")
    bootstrap_resamples: int = Field(default=1000, ge=0, le=100_000, description="Bootstrap resamples over prompts for each interval; 0 gives no intervals.")
    seed: int = Field(default=0, description="Seed of the bootstrap (and of the prompt folds of fitted weights).")
    confidence_level: float = Field(default=0.95, gt=0.5, lt=1.0, description="The intervals' confidence level.")

    @property
    def is_remote(self) -> bool:
        return "://" in self.path

    def location(self, panel_path: Path) -> str:
        """The file: a URL as given, a local path made absolute against the panel file's folder."""
        if self.is_remote:
            return self.path
        path = Path(self.path).expanduser()
        return str(path if path.is_absolute() else (panel_path.parent / path).resolve())


class Binarization(_Strict):
    strategy: Strategy = Field(default="best_vs_worst", description="How pairs are formed: best_vs_worst, best_vs_random or all_pairs.")
    min_margin: float = Field(default=0.0, ge=0.0, description="Pairs whose pooled ratings differ by less are dropped, for every strategy.")
    seed: int = Field(default=0, description="Seed of the random choices (best_vs_random's rejected answer, ties for best or worst).")
    # Contested pairs (poll_assets/scoring/confidence.py): left out and counted. None: keep every pair.
    min_judge_agreement: float | None = Field(default=None, ge=0.0, le=1.0, description=(
        "Pairs whose share of judges rating chosen strictly above rejected is below this are left out and counted."))
    min_margin_low: float | None = Field(default=None, ge=-4.0, le=4.0, description=(
        "Pairs whose 95% interval on the margin (bootstrap over judges) starts below this are left out and counted."))


@dataclass(frozen=True)
class Jury:
    """Who judges whom, and how: the generators and the judges (each in panel order), the judging
    settings and the pooling. What the pooling and preference stages and the estimate get of a panel."""

    generators: tuple[Member, ...]
    judges: tuple[Member, ...]
    judging: Judging
    pooling: Pooling

    @property
    def members(self) -> list[Member]:
        return [*self.generators, *self.judges]


class Thresholds(_Strict):
    max_generation_failure_rate: float = Field(default=0.1, ge=0, le=1, description="The generations_valid check (its failure_rate condition) fails a generator's shard above this share of failed generations.")
    max_parse_failure_rate: float = Field(default=0.2, ge=0, le=1, description="The ratings_valid check (its unrated_verdict_rate condition) fails a judge's shard above this share of verdicts without a rating.")
    min_agreement: float = Field(default=0.0, ge=-1, le=1, description="The judge_agreement check (warn only) flags a shard whose Krippendorff's alpha is below this.")


class Schedule(_Strict):
    """When the automation sensor re-checks the panel for missing, stale or failed partitions.

    Off by default: a tick can spend money on paid APIs, so a panel opts in."""

    cron: str = Field(default="0 3 * * *", description="When the automation sensor ticks (five-field cron).")
    timezone: str = Field(default="UTC", description="The cron's IANA time zone.")
    enabled: bool = Field(default=False, description="Start the sensor running; off by default, since a tick can spend money.")

    @field_validator("cron")
    @classmethod
    def _cron_is_valid(cls, v: str) -> str:
        from dagster._utils.schedules import is_valid_cron_string  # the parser Dagster itself uses

        if not is_valid_cron_string(v):
            raise ValueError(f"{v!r} is not a valid cron expression (five fields, e.g. '0 3 * * *')")
        return v

    @field_validator("timezone")
    @classmethod
    def _timezone_is_known(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not an IANA time zone name (e.g. 'UTC', 'Europe/Paris')") from None
        return v


class CacheSettings(_Strict):
    """Where the response cache lives: a SQLite file (the default), a PostgreSQL database (`url`, or
    `url_env` naming a variable that holds a URL with a password), or the Dagster instance's own
    PostgreSQL database (`backend: instance`)."""

    mode: CacheMode = Field(default="use", description="use (read and write), refresh (call again and overwrite) or bypass (leave the cache alone).")
    path: str | None = Field(default=None, description="The SQLite file; default $DAGSTER_HOME/llm_cache.sqlite.")
    backend: Literal["sqlite", "postgres", "instance"] | None = Field(default=None, description="sqlite, postgres or instance (the Dagster instance's own PostgreSQL); default postgres with a url, else sqlite.")
    url: str | None = Field(default=None, description="A PostgreSQL URL without a password (peer/trust auth or PGPASSWORD).")
    url_env: str | None = Field(default=None, description="An environment variable holding a PostgreSQL URL (one with a password goes here).")

    @model_validator(mode="after")
    def _one_place(self) -> "CacheSettings":
        if self.url and self.url_env:
            raise ValueError("cache: give `url` or `url_env`, not both")
        if self.url:
            if not self.url.startswith(PG_URL_PREFIXES):
                raise ValueError(f"cache.url must start with postgresql:// (got {self.url.split(':', 1)[0]}://...)")
            if urlsplit(self.url).password:
                raise ValueError("cache.url holds a password: put the URL in an environment variable and name it "
                                 "with `cache: {url_env: VAR}`, so no secret is written in the panel")
        has_url = bool(self.url or self.url_env)
        if self.backend in ("sqlite", "instance") and has_url:
            raise ValueError(f"cache: backend {self.backend!r} takes no url; drop `url`/`url_env` or use backend 'postgres'")
        if self.backend == "postgres" and not has_url:
            raise ValueError("cache: backend 'postgres' needs `url` or `url_env` (or use backend 'instance')")
        if self.path and self.resolved_backend != "sqlite":
            raise ValueError(f"cache.path is the SQLite file; backend {self.resolved_backend!r} does not use it")
        return self

    @property
    def resolved_backend(self) -> str:
        return self.backend or ("postgres" if self.url or self.url_env else "sqlite")


class Publish(_Strict):
    """Where `publish_job` writes the preference set, and the Hub dataset it uploads to (needs HF_TOKEN)."""

    out_dir: str | None = Field(default=None, description="Where publish_job writes the dataset; default $DAGSTER_HOME/exports/<panel name>.")
    repo_id: str | None = Field(default=None, description="A Hub dataset repo to upload to; None uploads nothing.")
    private: bool = Field(default=True, description="Create the Hub repo private.")
    token_env: str = Field(default="HF_TOKEN", description="The environment variable holding the Hub token.")


def _member_load(member: Member, calls_per_prompt: float) -> MemberLoad:
    """A member's load for the shard cost model: a `dataset` generator makes no call."""
    spec = provider_spec(member.provider)
    if member.source_column is not None:
        return MemberLoad(0.0, 1, 0.0)
    return MemberLoad(calls_per_prompt, member.limits.max_concurrency,
                      IN_PROCESS_CALL_S if spec.in_process else REMOTE_CALL_S, in_process=spec.in_process)


class Panel(_Strict):
    name: str = Field(description="The panel's name (in the dataset card and the export folder).")
    description: str = Field(default="", description="Free text about the panel.")
    source: Source = Field(description="Where the prompts come from and how they are sharded.")
    generators: list[Member] = Field(min_length=2, description="The members that answer every prompt (at least 2).")
    judges: list[Member] = Field(min_length=1, description="The members that rate every answer (at least 1); same fields as generators.")
    judging: Judging = Field(default_factory=Judging, description="The rubric and the bias controls.")
    pooling: Pooling = Field(default_factory=Pooling, description="How the judges' ratings of a generation are combined.")
    binarization: Binarization = Field(default_factory=Binarization, description="How pooled ratings become chosen/rejected pairs.")
    thresholds: Thresholds = Field(default_factory=Thresholds, description="Limits the asset checks hold each shard to.")
    schedule: Schedule = Field(default_factory=Schedule, description="The scheduled re-runs of missing, failed and stale shards.")
    cache: CacheSettings = Field(default_factory=CacheSettings, description="Where the response cache lives and how it is used.")
    prices: dict[str, Price] = Field(default_factory=dict, description="Model id -> price per million tokens, for the cost figures, the estimate and the budget.")
    publish: Publish = Field(default_factory=Publish, description="Where publish_job writes and uploads the dataset.")
    budget: BudgetSettings | None = Field(default=None, description="A spending cap per run over every member's calls; None sets no cap.")
    gold: Gold | None = Field(default=None, description="Human labels to calibrate each judge and the jury against (docs/calibration.md); None: no calibration.")

    @model_validator(mode="after")
    def _pairwise_anchor_is_a_generator(self) -> "Panel":
        anchor = self.judging.pairwise.against
        names = [g.name for g in self.generators]
        if anchor is not None and anchor not in names:
            raise ValueError(f"judging.pairwise.against: {anchor!r} is not a generator of this panel (they are {names})")
        if self.judging.mode == "pairwise" and self.pooling.method == "weighted":
            raise ValueError("pooling.method 'weighted' pools ratings; judging.mode 'pairwise' pools comparisons "
                             "with Bradley-Terry: use method 'mean' (the default) with pairwise judging")
        return self

    @model_validator(mode="after")
    def _weights_name_judges(self) -> "Panel":
        weights = self.pooling.weights
        if weights == "fit" and self.gold is None:
            raise ValueError("pooling.weights 'fit' fits the weights on gold labels: add `gold: {path: ...}`")
        if isinstance(weights, dict):
            judges = [j.name for j in self.judges]
            unknown = sorted(set(weights) - set(judges))
            if unknown:
                raise ValueError(f"pooling.weights: {unknown} are not judges of this panel (they are {judges})")
            missing = [j for j in judges if j not in weights]
            if missing:
                raise ValueError(f"pooling.weights: no weight for judges {missing}; give every judge one (0 leaves it out)")
        return self

    @model_validator(mode="after")
    def _budget_needs_prices(self) -> "Panel":
        if self.budget is None:
            return self
        unpriced = sorted({m.model for m in self.members if not provider_spec(m.provider).in_process} - set(self.prices))
        if unpriced:
            raise ValueError(f"budget: needs a price (prices:) for every paid member's model; missing: {unpriced}")
        if self.cache.resolved_backend != "sqlite":  # the run's spend ledger is a table of that file
            raise ValueError(f"budget: keeps each run's spend in the SQLite cache file; cache.backend "
                             f"{self.cache.resolved_backend!r} cannot hold it yet: use the SQLite cache or drop the budget")
        return self

    @model_validator(mode="after")
    def _dataset_members_only_generate(self) -> "Panel":
        readers = [j.name for j in self.judges if j.provider == "dataset"]
        if readers:
            raise ValueError(f"judges {readers}: provider 'dataset' only answers prompts from a column; a judge must "
                             "be a model")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> "Panel":
        names = [m.name for m in (*self.generators, *self.judges)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"member names must be unique across generators and judges; repeated: {dupes}")
        return self

    @model_validator(mode="after")
    def _batch_ids_need_sqlite(self) -> "Panel":
        # Batch ids are recorded in a table of the SQLite cache file; the PostgreSQL cache has no such
        # table yet, and a batch whose id cannot be recorded could be submitted twice.
        batched = [m.name for m in self.members if m.batch.enabled]
        if batched and self.cache.resolved_backend != "sqlite":
            raise ValueError(
                f"members {batched} run in batch mode, which records its batch ids in the SQLite cache; "
                f"cache.backend {self.cache.resolved_backend!r} cannot hold them yet: use the SQLite cache "
                "or turn batch mode off for these members"
            )
        return self

    @property
    def members(self) -> list[Member]:
        return [*self.generators, *self.judges]

    @property
    def jury(self) -> Jury:
        """The part of the panel that pooling, binarization and the estimate read."""
        return Jury(tuple(self.generators), tuple(self.judges), self.judging, self.pooling)

    @model_validator(mode="after")
    def _resolve_shard_size(self) -> "Panel":
        """An unset `source.shard_size` becomes the cost model's default for this panel's shape,
        here, once: every reader (partitions, code versions, the estimate) sees one number."""
        if self.source.shard_size is not None:
            return self
        source = self.source.model_copy(update={"shard_size": default_shard_size(self.shard_shape())})
        source._shard_size_chosen = True
        object.__setattr__(self, "source", source)  # the model is frozen; this is its own validation
        return self

    def shard_shape(self) -> ShardShape:
        """The panel's shape as the shard cost model reads it (poll_assets/shard_cost.py)."""
        judging = self.judging
        if judging.mode == "pairwise":
            judge_calls = float(comparisons_per_prompt(len(self.generators), anchored=judging.pairwise.against is not None,
                                                       both_orders=judging.pairwise.both_orders))
        else:
            judge_calls = 1.0
        generators = tuple(_member_load(g, 1.0) for g in self.generators)
        judges = tuple(_member_load(j, judge_calls) for j in self.judges)
        # per judge its stage's check and pending_rows, likewise per generator; prompts 1, pooled 2, pairs 2
        checks = 1 + 2 * len(self.generators) + 2 * len(self.judges) + 2 + 2
        assets = len(self.generators) + len(self.judges) + 4  # prompts, combined, pooled, pairs
        return ShardShape((generators, judges), events_per_shard(assets, checks), self.source.shards_per_run)

    def price_of(self, member: Member) -> Price | None:
        """The member's model's price, unset rates filled from its provider's published ones; None if unpriced."""
        price = self.prices.get(member.model)
        return None if price is None else price.for_provider(member.provider)

    def member_prices(self) -> dict[str, Price | None]:
        """`price_of` every member, by member name."""
        return {m.name: self.price_of(m) for m in self.members}

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)


def resolve_panel_path(spec: str | None = None) -> Path:
    """A bundled panel name ('local', 'paper') or a path to a YAML file."""
    spec = spec or os.environ.get(PANEL_ENV_VAR) or DEFAULT_PANEL
    bundled = PANELS_DIR / f"{spec}.yaml"
    if bundled.is_file():
        return bundled
    path = Path(spec).expanduser()
    if path.is_file():
        return path.resolve()
    available = sorted(p.stem for p in PANELS_DIR.glob("*.yaml"))
    raise PanelConfigError(
        f"{PANEL_ENV_VAR}={spec!r}: no such panel file; use a path to a YAML file or one of {available}"
    )


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.startswith(("function-", "literal[", "union[", "nullable[")):
            continue  # pydantic's internal validator names add noise, not location
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def load_panel(spec: str | Path | None = None) -> tuple[Panel, Path]:
    """Load and validate a panel. Returns the panel and the file it came from."""
    path = spec if isinstance(spec, Path) else resolve_panel_path(spec)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PanelConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise PanelConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        panel = Panel.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = _format_loc(tuple(err["loc"]))
            where = _name_member(raw, err["loc"], where)
            problems.append(f"{path}: {where}: {err['msg']}")
        raise PanelConfigError("\n".join(problems)) from None
    _check_data_files(panel.source, path)
    _check_gold(panel, path)
    return panel, path


def _check_gold(panel: Panel, path: Path) -> None:
    """Read a local gold file once at load, so a bad one is refused before any run (naming its line and
    field). A remote one (s3://...) is read at its first use, by the pooled_ratings step."""
    if panel.gold is None or panel.gold.is_remote:
        return
    from poll_assets.scoring.gold import GoldLabelError, load_gold
    from poll_assets.rubrics.ultrafeedback import get_rubric

    try:
        load_gold(panel.gold.location(path), get_rubric(panel.judging.aspect).ratings)
    except GoldLabelError as exc:
        raise PanelConfigError(f"{path}: gold.path: {exc}") from None


def _check_data_files(source: "Source", path: Path) -> None:
    """Local prompt files are relative to the panel file: name it, and that rule, when one is missing."""
    missing = [f for f in source.data_files or [] if not (path.parent / f).is_file()]
    if not missing:
        return
    lines = [f"{path}: source.data_files: no such file: {f} (looked for {(path.parent / f).resolve()}; "
             f"relative paths are relative to the folder of this panel file, {path.parent})" for f in missing]
    bundled = [PANELS_DIR.parent / "data" / Path(f).name for f in missing]
    hints = [str(b) for b in bundled if b.is_file()]
    hint = f"; the bundled file is at {', '.join(hints)}" if hints else ""
    raise PanelConfigError("\n".join(lines) + f"\nGive an absolute path, or one relative to {path.parent}{hint}.")


def _name_member(raw: dict[str, Any], loc: tuple[Any, ...], where: str) -> str:
    """Add the member's name to a location such as judges[1], so the user finds it at once."""
    if len(loc) >= 2 and loc[0] in ("generators", "judges") and isinstance(loc[1], int):
        try:
            name = raw[loc[0]][loc[1]].get("name")
        except (IndexError, AttributeError, KeyError, TypeError):
            name = None
        if name:
            return f"{where} (member {name!r})"
    return where
