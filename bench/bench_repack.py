"""Prefill and decode speed of each `--lp-repack` choice on this CPU, in one run.

Both models (the same file loaded with and without the CPU's extra weight buffer types) stay
loaded; the rounds alternate between them, and the best round of each is kept, so that the
ratio is not moved by the machine's slow and fast phases. `auto` is whichever of the two this
CPU gets (`resolve_repack("auto")`).

    .venv/bin/python bench/bench_repack.py [--model PATH] [--threads N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from cached_prompts.local.engine import (Context, Model, cpu_weight_buffer_types, init_backend,  # noqa: E402
                                         resolve_repack)
from cached_prompts.local.model_file import default_model_path  # noqa: E402
from cached_prompts.options import EngineOptions  # noqa: E402

FILLER_TOKEN = 1000  # the cost of a step does not depend on which token it decodes


def prefill_seconds(context: Context, n_tokens: int) -> float:
    start = time.perf_counter()
    for first in range(0, n_tokens, context.n_batch):
        count = min(context.n_batch, n_tokens - first)
        context.decode_sequence([FILLER_TOKEN] * count, first, 0)
    elapsed = time.perf_counter() - start
    context.seq_remove(0)
    return elapsed


def decode_seconds(context: Context, prompt: int, steps: int) -> float:
    context.decode_sequence([FILLER_TOKEN] * prompt, 0, 0)
    start = time.perf_counter()
    for step in range(steps):
        context.decode_step([FILLER_TOKEN], [prompt + step], [0])
    elapsed = time.perf_counter() - start
    context.seq_remove(0)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the default model)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill run")
    parser.add_argument("--steps", type=int, default=64, help="tokens of the decode run (one sequence)")
    args = parser.parse_args()
    path = args.model or default_model_path()
    init_backend(False)
    options = EngineOptions(n_ctx=max(1024, args.prefill + args.steps + 64), n_batch=512, n_threads=args.threads)
    sides = {}
    for repack in (True, False):
        model = Model(path, 0, repack=repack)
        sides[repack] = (model, Context(model, options, n_seq_max=1))
    best = {repack: [float("inf"), float("inf")] for repack in sides}
    for _ in range(args.repeats):
        for repack, (_, context) in sides.items():
            best[repack][0] = min(best[repack][0], prefill_seconds(context, args.prefill))
            best[repack][1] = min(best[repack][1], decode_seconds(context, 16, args.steps))
    print(f"model: {path.name}; CPU extra buffer types: {cpu_weight_buffer_types() or 'none'}; "
          f"auto = {'on' if resolve_repack('auto') else 'off'}; {args.threads} threads, best of {args.repeats}")
    print("| --lp-repack | prefill tok/s | decode tok/s |")
    print("| --- | --- | --- |")
    rates = {}
    for repack in sides:
        rates[repack] = (args.prefill / best[repack][0], args.steps / best[repack][1])
        print(f"| {'on' if repack else 'off'} | {rates[repack][0]:.1f} | {rates[repack][1]:.1f} |")
    print(f"| off / on | {rates[False][0] / rates[True][0]:.2f}x | {rates[False][1] / rates[True][1]:.2f}x |")
    for model, context in sides.values():
        context.close()
        model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
