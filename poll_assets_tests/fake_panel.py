"""A small panel that runs the real graph in well under a second per shard.

Members are declared `local` (so the panel validates like any other) but the test binds a
`FakeBackend` to each member's resource key instead: generators answer with a line naming the
member, judges return JSON verdicts shaped by the request's schema, with ratings derived from a hash so they vary between
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

from poll_assets.llm.base import CACHE_BREAK, CallRequest, ChatBackend, Completion, FatalProviderError, ProviderError
from poll_assets.llm.resources import resource_key
from poll_assets.panel import Panel, load_panel
from poll_assets_tests.fake_backend import Answer, FakeBackend, Script

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


def refusing(member: str, fail: str) -> Script | None:
    """A FakeBackend script for `fail`: "" never fails, "*" refuses every call (fatal), otherwise
    comma-separated words make a call whose prompt contains one fail (not retryable)."""
    if not fail:
        return None

    def script(text: str, attempt: int) -> BaseException | None:
        if fail == "*":
            return FatalProviderError("auth", f"scripted: {member} refuses every call")
        if any(w in text for w in fail.split(",")):
            return ProviderError("bad_request", f"scripted: {member} refuses this prompt")
        return None

    return script


def panel_answer(member: str, model: str) -> Answer:
    """Generators answer with a line naming the member; judges with JSON verdicts for the schema's keys."""

    def answer(request: CallRequest) -> Completion:
        text = request.messages[-1][1]
        if request.json_schema is not None and "preferred" in request.json_schema.get("properties", {}):
            # a pairwise comparison: A, B or tie, drawn from the member and the material
            material = text.split(CACHE_BREAK)[-1]
            digest = hashlib.sha256(f"{member}|{material}".encode()).digest()
            out, mode = json.dumps({"rationale": f"{member} compared", "preferred": ("A", "B", "tie")[digest[0] % 3]}), "json_schema"
        elif request.json_schema is not None:
            verdicts = {}
            material = text.split(CACHE_BREAK)[-1]  # the texts judged, not the rubric's wording
            for k in request.json_schema["required"]:
                digest = hashlib.sha256(f"{member}|{k}|{material}".encode()).digest()
                verdicts[k] = {"rationale": f"{member} on {k}", "rating": 1 + digest[0] % 5}
            out, mode = json.dumps(verdicts), "json_schema"
        else:
            out, mode = f"[{member}] {text[:40]}", "text"
        return Completion(text=out, finish_reason="stop", input_tokens=len(text.split()),
                          output_tokens=len(out.split()), model=model, output_mode=mode)

    return answer


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
    """A FakeBackend for every member's resource key. `fail` maps a member name to "*" (every call
    fails) or words that make a call fail; either failure is one the runner does not retry."""
    fail = fail or {}
    return {
        resource_key(m): FakeBackend(m.model, m.name, script=refusing(m.name, fail.get(m.name, "")),
                                     answer=panel_answer(m.name, m.model))
        for m in panel.members
    }
