"""A spending cap per run (`budget:` in the panel): no call starts once what the run spent, plus
what is in flight, plus the call's own worst case would pass `max_usd`.

One `RunBudget` per run, shared by every member: each member's calls go through a `MemberBudget`,
which prices a request at the member's rates before it starts (`reserve`) and books what it cost
when it is done (`settle`). What a run spent is kept in a ledger table beside the response cache,
keyed by the Dagster run id, so every step of a run (each its own process with the multiprocess
executor) draws on the same budget, and the spend stays visible after the run.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from poll_assets.llm.base import CallRequest, Completion
from poll_assets.llm.pricing import Price, TokenUsage
from poll_assets.llm.tokens import request_input_tokens


_RECHECK_S = 0.02  # how often a call waiting for room in the budget looks again


class BudgetSettings(BaseModel):
    """The panel's `budget:` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_usd: float = Field(gt=0, description="Most US dollars one run may spend, over every member's calls.")


class BudgetExceededError(RuntimeError):
    """Calls were left unstarted because the run's budget would have been passed."""


class BudgetLedger:
    """What each run spent, one row per settled call, in an SQLite file (the response cache's)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS run_spend (run_id TEXT NOT NULL, member TEXT NOT NULL, "
            "call_id TEXT NOT NULL, usd REAL NOT NULL, at REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS run_spend_run ON run_spend (run_id)")

    def spent(self, run_id: str) -> tuple[float, int]:
        """(US dollars, calls) booked for the run so far."""
        usd, calls = self._db.execute(
            "SELECT COALESCE(SUM(usd), 0), COUNT(*) FROM run_spend WHERE run_id = ?", (run_id,)
        ).fetchone()
        return float(usd), int(calls)

    def book(self, run_id: str, member: str, call_id: str, usd: float) -> None:
        self._db.execute("INSERT INTO run_spend VALUES (?, ?, ?, ?, ?)", (run_id, member, call_id, usd, time.time()))

    def close(self) -> None:
        self._db.close()


@dataclass
class RunBudget:
    """The run's cap, what it spent (from the ledger, so earlier steps count) and what is in flight."""

    max_usd: float
    run_id: str
    ledger: BudgetLedger | None = None
    spent_usd: float = 0.0
    calls: int = 0
    in_flight_usd: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, settings: BudgetSettings, run_id: str, ledger: BudgetLedger | None) -> "RunBudget":
        spent, calls = ledger.spent(run_id) if ledger is not None else (0.0, 0)
        return cls(settings.max_usd, run_id, ledger, spent, calls)

    def reserve(self, estimate_usd: float) -> bool:
        """Hold `estimate_usd` for a call about to start; False (nothing held) when it would pass the cap."""
        with self._lock:
            if self.spent_usd + self.in_flight_usd + estimate_usd > self.max_usd:
                return False
            self.in_flight_usd += estimate_usd
            return True

    def could_fit(self, estimate_usd: float) -> bool:
        """Whether a call of `estimate_usd` may still start once the calls in flight are done."""
        with self._lock:
            return self.in_flight_usd > 0 and self.spent_usd + estimate_usd <= self.max_usd

    def settle(self, estimate_usd: float, actual_usd: float, member: str = "", call_id: str = "") -> None:
        """A call held with `estimate_usd` is done and cost `actual_usd`."""
        with self._lock:
            self.in_flight_usd = max(0.0, self.in_flight_usd - estimate_usd)
            self.spent_usd += actual_usd
            self.calls += 1
        if self.ledger is not None:
            self.ledger.book(self.run_id, member, call_id, actual_usd)


@dataclass
class MemberBudget:
    """One member's view of the run's budget: its requests priced at its rates."""

    run: RunBudget
    member: str
    price: Price
    refused: int = 0  # calls not started because of the cap
    refused_usd: float = 0.0  # their worst-case estimate

    def worst_case_usd(self, request: CallRequest) -> float:
        """The request online, uncached, with the whole max_new_tokens allowance used."""
        return self.price.cost_usd(request_input_tokens(request), request.params.max_new_tokens)

    async def reserve(self, request: CallRequest) -> float | None:
        """The amount held for the request, or None when it must not start. While calls in flight
        may still free room (they are held at their worst case), it waits for them to settle."""
        estimate = self.worst_case_usd(request)
        while not self.run.reserve(estimate):
            if not self.run.could_fit(estimate):
                self.refused += 1
                self.refused_usd += estimate
                return None
            await asyncio.sleep(_RECHECK_S)
        return estimate

    def settle(self, held_usd: float, done: Completion) -> None:
        usage = TokenUsage(done.input_tokens, done.output_tokens, done.cached_input_tokens, done.cache_write_tokens)
        self.run.settle(held_usd, self.price.usage_cost_usd(usage), self.member, done.call_id)

    def exceeded(self, label: str, finished: int, cache_writes: bool) -> BudgetExceededError:
        """The error for a member that left `refused` calls unstarted: spent, remaining, what to do."""
        run = self.run
        kept = (f"the {finished} finished calls are cached and will not be paid again" if cache_writes
                else f"the response cache is off, so the {finished} finished calls will be paid again")
        return BudgetExceededError(
            f"{label}: the run's budget of ${run.max_usd:.4f} is reached: run {run.run_id} spent "
            f"${run.spent_usd:.4f} on {run.calls} calls; {self.refused} calls to member {self.member!r} were not "
            f"started (up to ${self.refused_usd:.4f} more at most). Raise budget.max_usd in the panel file "
            f"(`poll-assets estimate` shows what the rest costs) and re-materialize the partition; {kept}."
        )
