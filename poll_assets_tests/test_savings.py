"""What prompt caching and batch mode save on the `paper` panel's paid judges, measured on the loopback
server (its usage counted with a real tokenizer): the figures docs/calls.md quotes."""

from __future__ import annotations

import pytest

from poll_assets.panel import load_panel
from poll_assets_tests.test_estimate import PARTITION, env, materialize, member_meta, paper_shard  # noqa: F401

PAID = ("gpt35_turbo", "claude3_haiku")
BATCH = {"enabled": True, "poll_interval_s": 0.05, "max_poll_interval_s": 0.2}


def judge_costs(tmp_path, fake_llm, home, batch: bool) -> dict[str, tuple[float, float, int, int]]:
    """(paid, online uncached, cached input tokens, input tokens) of each paid judge for one shard."""
    path = paper_shard(tmp_path, fake_llm.url, size=10)
    if batch:
        import yaml

        raw = yaml.safe_load(path.read_text())
        for judge in raw["judges"]:
            if judge["name"] in PAID:
                judge["batch"] = BATCH
        path.write_text(yaml.safe_dump(raw))
    panel, _ = load_panel(path)
    result, instance = materialize(path, home)
    assert result.success
    out = {}
    for name in PAID:
        meta = member_meta(instance, "ratings", name)
        out[name] = (meta["llm/cost_usd"], meta["llm/cost_online_uncached_usd"],
                     meta["llm/cached_input_tokens"], meta["llm/input_tokens"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("batch", [False, True], ids=["online", "batch"])
def test_prompt_caching_and_batch_mode_cut_the_judges_bill(tmp_path, fake_llm, env, batch):  # noqa: F811
    fake_llm.configure(tokenizer="gguf")
    fake_llm.batches.reset(processing_s=0.1)
    costs = judge_costs(tmp_path, fake_llm, env, batch)
    for name, (paid, online, cached, total) in costs.items():
        saving = 1 - paid / online
        print(f"savings {'batch' if batch else 'online'} {name}: paid ${paid:.6f} vs ${online:.6f} online uncached "
              f"({saving:.1%} saved; {cached} of {total} input tokens from the prompt cache)")
        assert 0.25 * total < cached < total  # 9 of 10 prompts reuse the rubric prefix, about 40% of each
        assert paid < online
        if batch:
            assert saving > 0.5  # the batch discount, and caching on top of it
