"""The `dataset` provider: a generator whose answers are a column of the prompt source.

It makes no call: `assets.generations` reads the answers from the column the member names
(`source_column`) and writes rows that say where they came from. This backend exists so the member
has a row in the provider registry like any other; a request reaching it is a bug, said as such.
"""

from __future__ import annotations

from poll_assets.llm.base import BackendConfig, CallRequest, ChatBackend, Completion, ProviderError


class SourceColumnBackend(ChatBackend):
    provider = "dataset"

    def __init__(self, model: str, member: str = ""):
        self.model = model
        self.member = member

    @classmethod
    def from_config(cls, config: BackendConfig) -> "SourceColumnBackend":
        return cls(config.model, member=config.member)

    async def complete(self, request: CallRequest) -> Completion:
        raise ProviderError("bad_request", f"{self.who}: a `dataset` member takes its answers from the prompt "
                                           "source and is never called")
