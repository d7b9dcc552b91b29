"""Where the workload's time goes, printed: bench.py's workload timed per part by
profiling.timed_breakdown, then a cProfile of the same run.

  .venv/bin/python bench/profile_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import FULL, QUICK, Bench  # noqa: E402
from profiling import timed_breakdown  # noqa: E402

from cached_prompts.local.model_file import default_model_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    bench = Bench(QUICK if args.quick else FULL, args.threads or os.cpu_count() or 1, default_model_path())
    runner, _, _, work = bench.workload("f16")
    work()  # warm-up
    for part, seconds in timed_breakdown(work).items():
        print(f"{part:>18}: {seconds * 1000:8.1f} ms")
    profile = cProfile.Profile()
    profile.runcall(work)
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    runner.close()


if __name__ == "__main__":
    main()
