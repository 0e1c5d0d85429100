"""The whole-dataset benchmark (bench/dataset_scale.py) judges its targets from what it measured: a
change of one judge is met only by that judge's calls and what depends on it, and a size the run did
not measure is reported as not measured, never as met."""

from __future__ import annotations

from bench.bench_pipeline import Measurement
from bench.dataset_scale import DatasetRow, Events, Phase, judge_outcome, own_us_per_call, target_rows


def _m(wall: float = 10.0, cpu: float = 5.0, requests: int = 0, rss: float = 300.0, **detail: object) -> Measurement:
    return Measurement("x", 0, wall, None, requests, rss, 0.0, True, {"process_cpu_s": cpu, **detail})


def _row(n: int, judge_requests: dict[str, int], rematerialized: dict[str, int]) -> DatasetRow:
    judge = Phase(_m(requests=sum(judge_requests.values()), requests_by_tag=judge_requests),
                  Events(materialized=rematerialized))
    return DatasetRow(
        n=n, calls=7 * n, assets=11, shards=n // 50, shard_size=50, bare=_m(wall=8.0), build=Phase(_m(cpu=9.0)),
        dagster_floor=Phase(_m(cpu=2.0)), warm=Phase(_m(wall=3.0, cpu=2.7)), cached=Phase(_m(cpu=2.7)),
        judge=judge, judge_name="command_r_plus", judge_tag="hf_command_r_plus",
    )


def test_a_judge_change_is_met_only_by_that_judges_calls_and_its_dependents():
    dependents = {"ratings/command_r_plus": 2, "pooled_ratings": 2, "preference_pairs": 2}
    assert judge_outcome(_row(100, {"hf_command_r_plus": 100}, dependents))[0]
    # every asset redone: the calls were right, the re-materializations were not
    met, what = judge_outcome(_row(100, {"hf_command_r_plus": 100}, {**dependents, "prompts": 2}))
    assert not met and "prompts" in what
    # another member called, or the judge called for fewer prompts than it rates
    assert not judge_outcome(_row(100, {"hf_command_r_plus": 100, "gpt35_turbo": 3}, dependents))[0]
    assert not judge_outcome(_row(100, {"hf_command_r_plus": 60}, dependents))[0]
    assert not judge_outcome(_row(100, {"hf_command_r_plus": 100}, {}))[0]


def test_targets_of_sizes_not_measured_say_so_and_cpu_per_call_subtracts_dagsters_floor():
    row = _row(1000, {"hf_command_r_plus": 1000}, {"ratings/command_r_plus": 20})
    # (2.7 s of the cached pass - 2.0 s of Dagster's floor) over 7,000 calls
    assert abs(own_us_per_call(row, row.cached) - 100.0) < 1e-6
    table = {target: (measured, met) for target, measured, met in target_rows([row])}
    assert table["cold build <= 1.25 x bare client, N=10,000"] == ("not measured", "not measured")
    assert table["warm re-run <= 10 s, N=10,000"] == ("not measured", "not measured")
    assert table["our CPU per cached call <= 150 µs, N=1,000"] == ("100 µs", "met")
    assert table["peak RSS N=10,000 <= 1.3 x N=1,000"][1] == "not measured"


def test_the_cached_pass_is_the_warm_rerun_when_it_redid_everything_else_a_forced_rerun(monkeypatch):
    import bench.dataset_scale as scale

    class Case:
        cli_env: dict = {}

        def __init__(self) -> None:
            self.calls: list[list[str]] = []

        def cli(self, label: str, args: list[str], log: str) -> Phase:
            self.calls.append(args)
            return Phase(_m(), Events(materialized={"prompts": 2, "rest": 20}))

    full = Phase(_m(), Events(materialized={"prompts": 2, "rest": 20}))
    case = Case()
    assert scale.cached_pass(case, full, every_partition=22) is full and case.calls == []
    skipped = Phase(_m(), Events())  # a warm re-run that found everything fresh
    monkeypatch.setattr(scale, "cli_has_force", lambda env: False)
    assert scale.cached_pass(case, skipped, every_partition=22) is None and case.calls == []
    monkeypatch.setattr(scale, "cli_has_force", lambda env: True)
    forced = scale.cached_pass(case, skipped, every_partition=22)
    assert case.calls == [["--all", "--force"]] and forced is not None
    # a forced pass that called the provider is not a cached pass
    monkeypatch.setattr(Case, "cli", lambda self, label, args, log: Phase(_m(requests=5), full.events))
    assert scale.cached_pass(case, skipped, every_partition=22) is None
