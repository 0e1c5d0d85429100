"""A small panel that runs the real graph in well under a second per shard.

Members are declared `local` (so the panel validates like any other) but the test binds a
`ScriptedBackend` to each member's resource key instead: generators answer with a line naming the model, judges return JSON
verdicts shaped by the request's schema, with ratings derived from a hash so they vary between
generations and judges. `fail` makes a member raise on every call, or on calls whose prompt
contains one of the given words.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any
import yaml

from poll_assets.llm.base import CallRequest, ChatBackend, Completion, FatalProviderError, ProviderError
from poll_assets.llm.resources import resource_key
from poll_assets.panel import Panel, load_panel

PROMPTS = [
    "Name three primary colours.",
    "Write one sentence about rivers.",
    "Give a synonym for quick.",
    "Translate 'bonjour' into English.",
    "Count from one to five.",
    "Say why the sky looks blue, in one line.",
    "List two mammals that swim.",
    "Suggest a name for a grey cat.",
]


class ScriptedBackend(ChatBackend):
    provider = "scripted"

    def __init__(self, member: str, model: str, fail: str) -> None:
        self.member = member
        self.model = model
        self.fail = fail  # "" = never, "*" = every call, otherwise comma-separated words

    def _should_fail(self, text: str) -> bool:
        if not self.fail:
            return False
        return self.fail == "*" or any(w in text for w in self.fail.split(","))

    async def complete(self, request: CallRequest) -> Completion:
        text = request.messages[-1][1]
        if self._should_fail(text):
            if self.fail == "*":
                raise FatalProviderError("auth", f"scripted: {self.member} refuses every call")
            raise ProviderError("bad_request", f"scripted: {self.member} refuses this prompt")
        if request.json_schema is not None:
            keys = request.json_schema["required"]
            verdicts = {}
            for k in keys:
                digest = hashlib.sha256(f"{self.member}|{k}|{text}".encode()).digest()
                verdicts[k] = {"rationale": f"{self.member} on {k}", "rating": 1 + digest[0] % 5}
            answer = json.dumps(verdicts)
            mode = "json_schema"
        else:
            answer = f"[{self.member}] {text[:40]}"
            mode = "text"
        return Completion(text=answer, finish_reason="stop", input_tokens=len(text.split()),
                          output_tokens=len(answer.split()), model=self.model, output_mode=mode)


def write_panel_file(tmp_path: Path, raw: dict[str, Any], *, prompts: Sequence[str] = (),
                     name: str = "panel.yaml") -> Path:
    """The one way tests write a panel file: `raw` as YAML, and `prompts` (when given) beside it as
    prompts.jsonl, one `{"prompt": ...}` per line, for `source.data_files: [prompts.jsonl]`."""
    if prompts:
        (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def write_panel(tmp_path: Path, *, n_prompts: int = 4, shard_size: int = 2, n_generators: int = 2,
                n_judges: int = 2, extra: dict | None = None, name: str = "panel.yaml") -> tuple[Panel, Path]:
    """The scripted panel (all members `local`, see `scripted_resources`), written and loaded."""
    raw = {
        "name": "scripted",
        "source": {"data_files": ["prompts.jsonl"], "column_mapping": {"prompt": "instruction"},
                   "num_examples": n_prompts, "shard_size": shard_size},
        "generators": [{"name": f"gen_{i}", "provider": "local", "model": f"gen-model-{i}", "family": f"g{i}"}
                       for i in range(n_generators)],
        "judges": [{"name": f"judge_{i}", "provider": "local", "model": f"judge-model-{i}", "family": f"j{i}",
                    "params": {"temperature": 0.0}} for i in range(n_judges)],
        "thresholds": {"max_generation_failure_rate": 0.1, "max_parse_failure_rate": 0.2, "min_agreement": -1.0},
        "schedule": {"cron": "0 3 * * *", "enabled": True},
        **(extra or {}),
    }
    return load_panel(write_panel_file(tmp_path, raw, prompts=PROMPTS, name=name))


def scripted_resources(panel: Panel, fail: dict[str, str] | None = None) -> dict[str, ChatBackend]:
    """A backend for every member's resource key. `fail` maps a member name to "*" (every call fails)
    or words that make a call fail; either failure is one the runner does not retry."""
    fail = fail or {}
    return {resource_key(m): ScriptedBackend(m.name, m.model, fail.get(m.name, "")) for m in panel.members}
