"""How often the calibration's 95 % bootstrap intervals cover the known value, over seeded simulations.

Not a test (poll_assets_tests/test_calibration.py runs the same check on fewer simulations). The
judges are those of poll_assets_tests/calibration_sim.py (close, biased by +1, random, prefers the
first position); the known value of each figure is its value on a 10,000-prompt simulation.

    PYTHONPATH=$PWD .venv/bin/python bench/calibration_coverage.py --sims 200 --prompts 80 --resamples 1000

Prints one line per rater and figure (coverage, and whether it reaches 90 %) and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time

from poll_assets_tests.calibration_sim import coverage

KEYS = ("close", "biased", "random", "position", "jury_mean", "without_random")
METRICS = ("kappa", "tau", "spearman", "mae", "bias", "pref_agreement", "pref_kappa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sims", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=80)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    start = time.monotonic()
    shares = coverage(args.sims, args.prompts, args.resamples, KEYS, METRICS)
    seconds = time.monotonic() - start
    for name, share in shares.items():
        print(f"{name:32s} {share:6.3f} {'ok' if share >= 0.9 else 'BELOW 0.90'}")
    below = sorted(n for n, s in shares.items() if s < 0.9)
    print(json.dumps({"sims": args.sims, "prompts": args.prompts, "resamples": args.resamples,
                      "figures": len(shares), "min_coverage": min(shares.values()),
                      "mean_coverage": sum(shares.values()) / len(shares), "below_0.90": below,
                      "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
