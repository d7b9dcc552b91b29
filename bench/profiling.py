"""Where the workload's time goes: timers wrapped around the engine calls for one run.

`timed_breakdown(work)` runs `work()` once with the timers in place and returns seconds per
part: prefill (llama_decode of prompts and preludes), decode (llama_decode of generation
steps), sampling (llama_sampler_sample), sampler set-up (chains built and fed the history),
state restore, and the rest (the Python around them: token bookkeeping, detokenizing, stops).

Run it through bench/profile_bench.py (bench.py imports this module, so the runnable part
lives apart and the two never import each other).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Iterator

from cached_prompts.local.engine import Context
from cached_prompts.local.sampler import SamplerChain

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
