"""The reference shape in distilabel 1.5.3, for bench_pipeline.py. Runs in its OWN venv (distilabel pins packages):

    python3 -m venv /work/bench-venv && /work/bench-venv/bin/pip install "distilabel[openai]==1.5.3" requests
    /work/bench-venv/bin/python bench/distilabel_pipeline.py --server http://127.0.0.1:PORT --prompts p.jsonl --workdir W

LoadDataFromDicts -> 4 x TextGeneration -> GroupColumns -> 3 x UltraFeedback (instruction-following) -> GroupColumns.

The seed pipeline used InferenceEndpointsLLM for most members; here every member is an OpenAILLM whose
base_url is the fake server (which speaks OpenAI chat completions), so both tools make the same
number of HTTP calls to the same server with the same latency: what differs is the orchestration.
Imports nothing from poll_assets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

GENERATORS = ["llama3_8b", "gemma_7b", "phi3_mini", "mistral_7b"]
JUDGES = ["command_r_plus", "gpt35_turbo", "claude3_haiku"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--gen-batch-size", type=int, default=10)
    parser.add_argument("--judge-batch-size", type=int, default=5)
    args = parser.parse_args()
    started = time.monotonic()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from distilabel.models import OpenAILLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import GroupColumns, LoadDataFromDicts
    from distilabel.steps.tasks import TextGeneration, UltraFeedback

    with open(args.prompts, encoding="utf-8") as f:
        data = [{"instruction": json.loads(line)["prompt"]} for line in f if line.strip()]

    def llm(name: str, temperature: float) -> OpenAILLM:
        return OpenAILLM(
            model=name,
            base_url=f"{args.server}/dl_{name}/v1",
            api_key="fake-key",  # type: ignore[arg-type]
            max_retries=5,
            timeout=120,
            generation_kwargs={"max_new_tokens": 1024, "temperature": temperature},
        )

    with Pipeline(name="poll-bench", cache_dir=os.path.join(args.workdir, "cache")) as pipeline:
        load = LoadDataFromDicts(name="load", data=data, batch_size=args.gen_batch_size)
        gens = [
            TextGeneration(name=f"gen_{g}", llm=llm(g, 0.7), input_batch_size=args.gen_batch_size) for g in GENERATORS
        ]
        combine = GroupColumns(
            name="combine_generations",
            columns=["generation", "model_name"],
            output_columns=["generations", "generation_models"],
        )
        judges = [
            UltraFeedback(
                name=f"judge_{j}", llm=llm(j, 0.0), aspect="instruction-following", input_batch_size=args.judge_batch_size
            )
            for j in JUDGES
        ]
        pool = GroupColumns(
            name="combine_ratings",
            columns=["ratings", "rationales", "model_name"],
            output_columns=["poll_ratings", "poll_rationales", "poll_models"],
        )
        load >> gens >> combine >> judges >> pool

    run_start = time.monotonic()
    distiset = pipeline.run(use_cache=False)
    run_s = time.monotonic() - run_start
    rows = len(distiset["default"]["train"])
    print(
        "BENCH_RESULT "
        + json.dumps(
            {
                "success": rows == len(data),
                "rows": rows,
                "run_s": run_s,
                "startup_s": run_start - started,
                "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "children_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                "cpu_s": sum(
                    getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                    for f in ("ru_utime", "ru_stime")
                ),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
