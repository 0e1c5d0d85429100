"""Asset checks: the generic glue between a stage's pure check functions and Dagster.

Each stage module owns its checks: pure `check_*` functions over frames that return a `Finding`
(passed, a sentence saying what is wrong and where, and metadata), and the `StageCheck`s that name
them, with their thresholds from the panel. This module only turns those into what Dagster wants:
`asset_check_specs(...)` gives the specs an asset declares, and `evaluate_checks(...)` the results
its step yields after its output. The checks run inside the step that makes the asset they check,
on the frame it just made: a separate check step would cost its own step events and a reload of the
asset from Parquet.

An asset's conditions of one severity are one check (`combined_check`): Dagster writes an
evaluation event per check and shard, and the UI still sees every condition, named in the message
when it fails and with its figures in the metadata.

Checks that guard data downstream stages consume are blocking: when one fails, the step fails
after storing its output, so the next stage never reads the bad shard. Agreement between judges
only warns: low agreement is worth a look but is not wrong data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
import warnings
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pandas as pd

MAX_EXAMPLES = 5  # rows named in a failure message; the count is always exact
# The name under which a step hands its checks the frame it read (prompts for a generator,
# combined_generations for a judge and for pooling), for the checks that compare the two.
STEP_INPUT = "step_input"


@dataclass(frozen=True)
class Finding:
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def examples(items: Sequence[Any]) -> str:
    """The first few items for a message, and how many there are in all."""
    shown = ", ".join(str(i) for i in items[:MAX_EXAMPLES])
    return shown + (f", ... ({len(items)} in all)" if len(items) > MAX_EXAMPLES else "")


def short_id(pid: Any) -> str:
    return str(pid)[:12]


def absent_ids(ids: Sequence[Any], among: Sequence[Any]) -> list[str]:
    """Short forms of the ids in `ids` that `among` lacks, in order (the set is built once)."""
    present = set(among)
    return [short_id(p) for p in ids if p not in present]


def repeated_ids(ids: Sequence[Any]) -> list[str]:
    """Short forms of the ids that occur more than once, sorted."""
    series = pd.Series(list(ids), dtype=object)
    return sorted({short_id(p) for p in series[series.duplicated()]})


def problems_finding(problems: list[str], ok: str, metadata: dict[str, Any]) -> Finding:
    """Passed when there is no problem; the description lists the problems, or says what was fine."""
    return Finding(passed=not problems, description="; ".join(problems) or ok, metadata=metadata)


@dataclass(frozen=True)
class StageCheck:
    """One check of a stage's asset. `run(value, given)` gets the frame the step made and the values
    the step hands its checks by name (`needs` lists the names this check reads, e.g. the step's
    input frame, or a figure the step already computed)."""

    name: str
    description: str
    run: Callable[[pd.DataFrame, Mapping[str, Any]], Finding]
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR
    needs: tuple[str, ...] = ()

    @property
    def blocking(self) -> bool:
        return self.severity == dg.AssetCheckSeverity.ERROR


def merged_findings(findings: Sequence[tuple[str, Finding]]) -> Finding:
    """One finding for several conditions of one check: passed when all passed; the description
    names each failing condition with its own sentence (or, when all passed, says what each found);
    the metadata holds every condition's figures (a key two conditions share is prefixed with the
    condition's name) and `failed_conditions`, the names of those that failed."""
    failed = [name for name, f in findings if not f.passed]
    shown = [(name, f) for name, f in findings if not f.passed] if failed else list(findings)
    metadata: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for _, f in findings:
        for key in f.metadata:
            counts[key] = counts.get(key, 0) + 1
    for name, f in findings:
        metadata.update({(f"{name}/{k}" if counts[k] > 1 else k): v for k, v in f.metadata.items()})
    metadata["failed_conditions"] = ", ".join(failed) or "none"
    return Finding(not failed, "; ".join(f"{name}: {f.description}" for name, f in shown), metadata)


def combined_check(name: str, description: str, conditions: Sequence[StageCheck]) -> StageCheck:
    """One check made of several conditions of the same severity (each a StageCheck whose name
    names the condition in messages and metadata). Each asset check costs Dagster an evaluation
    event per shard, so the conditions an asset's data must meet are reported together."""
    severities = {c.severity for c in conditions}
    if len(severities) != 1:
        raise ValueError(f"check {name}: its conditions must share one severity, got {sorted(map(str, severities))}")
    needs = tuple(dict.fromkeys(n for c in conditions for n in c.needs))

    def run(value: pd.DataFrame, given: Mapping[str, Any]) -> Finding:
        return merged_findings([(c.name, c.run(value, given)) for c in conditions])

    return StageCheck(name, description, run, severities.pop(), needs)


def _result(finding: Finding, check: StageCheck, key: dg.AssetKey) -> dg.AssetCheckResult:
    # A step that makes several assets must say which asset and check each result is for.
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=check.name,
        passed=finding.passed,
        severity=check.severity,
        description=finding.description,
        metadata={k: (dg.MetadataValue.null() if v is None else v) for k, v in finding.metadata.items()},
    )


def asset_check_specs(
    checks: Sequence[StageCheck], key: dg.AssetKey, partitions_def: dg.PartitionsDefinition | None = None
) -> list[dg.AssetCheckSpec]:
    """The check specs the asset `key` declares (`check_specs=` of its @asset / @multi_asset).

    Partitioned like the asset, so each evaluation is recorded against the shard the step made.
    Dagster 1.13 calls a partitioned check spec "preview" and warns once per spec on every load;
    only that warning is silenced, here where the spec is made."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Specifying a partitions_def on an AssetCheckSpec", dg.PreviewWarning)
        return [
            dg.AssetCheckSpec(c.name, asset=key, description=c.description, blocking=c.blocking,
                              partitions_def=partitions_def)
            for c in checks
        ]


def evaluate_checks(
    checks: Sequence[StageCheck],
    key: dg.AssetKey,
    value: pd.DataFrame,
    given: Mapping[str, Any] | None = None,
    selected: AbstractSet[dg.AssetCheckKey] | None = None,
) -> list[dg.AssetCheckResult]:
    """Run `checks` of the asset `key` on the frame its step just made, keeping only the `selected`
    ones when given. Yield these after the asset's output: Dagster stores the output first, and
    fails the step after it when a blocking one fails."""
    given = given or {}
    results = []
    for check in checks:
        if selected is not None and dg.AssetCheckKey(key, check.name) not in selected:
            continue
        lacking = [n for n in check.needs if n not in given]
        if lacking:
            raise ValueError(f"check {key.to_user_string()}:{check.name} needs {', '.join(lacking)}, "
                             "but the step gave none")
        results.append(_result(check.run(value, given), check, key))
    return results
