"""Where the workload's time goes: timers wrapped around the engine calls for one run.

`timed_breakdown(work)` runs `work()` once with the timers in place and returns seconds per
part: prefill (llama_decode of prompts and preludes), decode (llama_decode of generation
steps), sampling (llama_sampler_sample), sampler set-up (chains built and fed the history),
state restore, and the rest (the Python around them: token bookkeeping, detokenizing, stops).

  .venv/bin/python bench/profiling.py [--quick]   # also prints a cProfile of the same run
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Iterator

from cached_prompts.local.engine import Context, SamplerChain

PARTS = {"prefill": (Context, "decode_sequence"), "decode": (Context, "decode_step"),
         "sampling": (SamplerChain, "sample"), "sampler_setup": (SamplerChain, "__init__"),
         "sampler_history": (SamplerChain, "remember"), "restore": (Context, "set_seq_state")}


@contextmanager
def _timers(spent: dict[str, float]) -> Iterator[None]:
    originals = {}
    for part, (owner, name) in PARTS.items():
        original = getattr(owner, name)
        originals[part] = original

        def wrapper(*args: Any, _original: Callable[..., Any] = original, _part: str = part,
                    **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_part] += time.perf_counter() - start

        setattr(owner, name, wrapper)
    try:
        yield
    finally:
        for part, (owner, name) in PARTS.items():
            setattr(owner, name, originals[part])


def timed_breakdown(work: Callable[[], object]) -> dict[str, float]:
    spent = {part: 0.0 for part in PARTS}
    with _timers(spent):
        start = time.perf_counter()
        work()
        total = time.perf_counter() - start
    spent["python_and_other"] = total - sum(spent.values())
    spent["total"] = total
    return spent


def main() -> None:
    import argparse
    import cProfile
    import os
    import pstats

    from bench import FULL, QUICK, Bench
    from cached_prompts.local.model_file import default_model_path

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
