"""The speed benchmark of issue #4, in one run on the default model (see README, "Speed").

  .venv/bin/python bench/bench.py            # full sizes (a few minutes on 2 cores)
  .venv/bin/python bench/bench.py --quick    # tiny sizes: a smoke test of the script

Figures: time to first token cold vs restored from our cache; cache bytes per prelude token
vs the model's raw KV and vs llama-cpp-python's Llama.save_state(); the N outputs x M tokens
x P prompts workload, ours vs llama-cpp-python's high-level create_completion loop reusing
its in-RAM prefix; decode tokens/s with 1, N and P*N sequences; and where our workload's time
goes. Everything is also written as JSON (default bench/results/latest.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profiling import timed_breakdown  # noqa: E402
from workload import prelude as prelude_text, prompt as prompt_text  # noqa: E402

from cached_prompts.cache.store import CacheStore  # noqa: E402
from cached_prompts.local.engine import resolve_repack  # noqa: E402
from cached_prompts.local.model_file import default_model_path  # noqa: E402
from cached_prompts.options import EngineOptions, SamplingOptions, derive_seed  # noqa: E402
from cached_prompts.backend.interface import GenerationRequest, PromptJob  # noqa: E402
from cached_prompts.local.backend import LocalBackend as Runner  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def generate(runner: Runner, prelude: list[int], fulls: list[list[int]], sampling: SamplingOptions,
             seeds: list[int | None], *, store: bool = True, on_step: Callable[[int], None] | None = None) -> None:
    """The same seeds for every prompt (joint tokens), decoded together."""
    request = GenerationRequest(prelude, [PromptJob(full, list(seeds)) for full in fulls], sampling, "bench",
                                store=store)
    runner.generate(request, on_step=on_step)


@dataclass
class Sizes:
    examples: int  # few-shot stories in the prelude (11 -> 1,459 tokens)
    prompts: int
    outputs: int
    max_tokens: int
    repeats: int
    n_ctx: int


FULL = Sizes(examples=11, prompts=3, outputs=5, max_tokens=48, repeats=3, n_ctx=4096)
QUICK = Sizes(examples=1, prompts=2, outputs=2, max_tokens=4, repeats=1, n_ctx=1024)


class Bench:
    def __init__(self, sizes: Sizes, threads: int, model_path: Path) -> None:
        self.sizes, self.threads, self.model_path = sizes, threads, model_path
        self.prelude = prelude_text(sizes.examples)
        self.prompts = [prompt_text(i) for i in range(sizes.prompts)]
        self.sampling = SamplingOptions(max_tokens=sizes.max_tokens)  # the CLI's defaults
        self.seeds = [derive_seed(0, k) for k in range(sizes.outputs)]
        self.results: dict[str, Any] = {}

    def runner(self, kv_type: str, cache_dir: Path | None) -> Runner:
        options = EngineOptions(model_path=str(self.model_path), n_ctx=self.sizes.n_ctx,
                                n_threads=self.threads, kv_type=kv_type)
        return Runner(options, cache_dir)

    # ----- 1 and 2: time to first token, cache size ------------------------------------------

    def ttft_and_size(self, kv_type: str) -> None:
        first = self.sampling.model_copy(update={"max_tokens": 1})
        with tempfile.TemporaryDirectory() as folder:
            runner = self.runner(kv_type, Path(folder))
            try:
                prelude = runner.prelude_tokens(self.prelude, "bench prelude")
                prompt = runner.joint_tokens(self.prelude, self.prompts[0])

                def first_token(fresh_store: bool) -> float:
                    runner.unload()
                    if fresh_store:  # a new process: nothing of the entry in RAM but the page cache
                        runner.cache = CacheStore(Path(folder), runner.settings, str(self.model_path))
                    start = time.perf_counter()
                    generate(runner, prelude, [prompt], first, self.seeds[:1], store=False)
                    return time.perf_counter() - start

                cold = [first_token(False) for _ in range(self.sizes.repeats)]
                runner.unload()
                runner.prepare_prelude(prelude, "bench")
                restored = [first_token(True) for _ in range(self.sizes.repeats)]
                assert runner.counters.sources[-1] == "cache", runner.counters.sources
                entry = runner.cache.entries()[0]
                raw = raw_kv_bytes_per_token(runner)
                per_token = entry.state_bytes / (len(prelude) - 1)
            finally:
                runner.close()
        self.results[f"ttft_{kv_type}"] = {
            "prelude_tokens": len(prelude), "prompt_tokens": len(prompt) - len(prelude) + 1,
            "cold_s": min(cold), "restored_s": min(restored), "cold_all_s": cold,
            "restored_all_s": restored, "ratio_cold_over_restored": min(cold) / min(restored)}
        self.results[f"cache_{kv_type}"] = {
            "entry_bytes": entry.state_bytes, "bytes_per_token": per_token,
            "raw_f16_kv_bytes_per_token": raw, "ratio_to_raw_f16": per_token / raw}

    def llama_cpp_python_state(self) -> None:
        llm = self.llama()
        try:
            tokens = llm.tokenize(self.prelude.encode("utf-8"), special=True)
            llm.eval(tokens)
            state = llm.save_state()
        finally:
            llm.close()
        size = len(bytes(state.llama_state))
        self.results["llama_cpp_python_save_state"] = {
            "bytes": size, "tokens": len(tokens), "bytes_per_token": size / len(tokens)}

    # ----- 3 and 4: the workload and decode rates ----------------------------------------------

    def workload(self, kv_type: str) -> tuple[Runner, list[int], list[list[int]], Callable[[], None]]:
        """A runner with the prelude loaded, its tokens, and the workload with prompts together."""
        runner = self.runner(kv_type, None)
        prelude = runner.prelude_tokens(self.prelude, "bench prelude")
        prompts = [runner.joint_tokens(self.prelude, p) for p in self.prompts]
        runner.prepare_prelude(prelude, "bench")

        def together() -> None:
            generate(runner, prelude, prompts, self.sampling, self.seeds)

        return runner, prelude, prompts, together

    def workload_ours(self, kv_type: str) -> None:
        runner, prelude, prompts, together = self.workload(kv_type)
        try:
            def one_prompt_at_a_time() -> None:
                for prompt in prompts:
                    generate(runner, prelude, [prompt], self.sampling, self.seeds)

            figures = {"prompts_together": self.timed_tokens(runner, together),
                       "prompts_one_at_a_time": self.timed_tokens(runner, one_prompt_at_a_time)}
            if kv_type == "f16":
                figures["decode"] = self.decode_rates(runner, prelude, prompts)
                figures["time_breakdown"] = timed_breakdown(together)
        finally:
            runner.close()
        self.results[f"workload_ours_{kv_type}"] = figures

    def timed_tokens(self, runner: Runner, work) -> dict[str, float]:
        runs = []
        for _ in range(self.sizes.repeats):
            before = runner.counters.generated_tokens
            start = time.perf_counter()
            work()
            runs.append((time.perf_counter() - start, runner.counters.generated_tokens - before))
        seconds, tokens = min(runs)
        return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                "all_tokens_per_s": [t / s for s, t in runs]}

    def decode_rates(self, runner: Runner, prelude: list[int], prompts: list[list[int]]) -> dict[str, Any]:
        """Generated tokens/s between the first and the last sampling step (prefill excluded)."""
        rates = {}
        for label, count in (("1", 1), (str(len(self.seeds)), len(self.seeds)),
                             (str(len(self.seeds) * len(prompts)), len(self.seeds) * len(prompts))):
            per_prompt = min(count, len(self.seeds))
            used = prompts[: max(1, count // per_prompt)]
            stamps: list[tuple[float, int]] = []
            generate(runner, prelude, used, self.sampling, self.seeds[:per_prompt],
                     on_step=lambda n: stamps.append((time.perf_counter(), n)))
            # the first len(used) steps each sample one prompt's first tokens, after its prefill
            decode = stamps[len(used) - 1:]
            tokens = sum(n for _, n in decode[1:])
            rates[f"{label}_sequences_tokens_per_s"] = tokens / max(decode[-1][0] - decode[0][0], 1e-9)
        return rates

    def llama(self) -> llama_cpp.Llama:
        # Llama takes no use_extra_bufts; without it, its model crashes on AMX CPUs as ours would
        # (local/engine.py): hand it default parameters with our --lp-repack auto choice.
        bindings = llama_cpp.llama_cpp
        default_params = bindings.llama_model_default_params

        def safe_params() -> Any:
            params = default_params()
            params.use_extra_bufts = resolve_repack("auto")
            return params

        bindings.llama_model_default_params = safe_params
        try:
            return llama_cpp.Llama(str(self.model_path), n_ctx=self.sizes.n_ctx, n_batch=512,
                                   n_threads=self.threads, n_threads_batch=self.threads, verbose=False)
        finally:
            bindings.llama_model_default_params = default_params

    def workload_baseline(self) -> None:
        """The best a user gets by hand: one Llama object, prelude + prompt each call, so its
        prefix matching skips the prelude; the same sampling options as ours."""
        llm = self.llama()
        s = self.sampling
        try:
            llm.create_completion(self.prelude, max_tokens=1)  # the prelude now sits in its KV

            def loop() -> int:
                tokens = 0
                for prompt in self.prompts:
                    for seed in self.seeds:
                        out = llm.create_completion(
                            self.prelude + prompt, max_tokens=s.max_tokens, temperature=s.temperature,
                            top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, repeat_penalty=s.repeat_penalty,
                            frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
                            seed=seed)
                        tokens += out["usage"]["completion_tokens"]
                return tokens

            runs = []
            for _ in range(self.sizes.repeats):
                start = time.perf_counter()
                tokens = loop()
                runs.append((time.perf_counter() - start, tokens))
        finally:
            llm.close()
        seconds, tokens = min(runs)
        self.results["workload_llama_cpp_python"] = {
            "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "all_tokens_per_s": [t / s for s, t in runs]}


def raw_kv_bytes_per_token(runner: Runner) -> int:
    """f16 K and V of every layer: layers x KV heads x head size x 2 x 2 bytes."""
    model = runner.model.handle
    head = llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)
    return llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model) * head * 2 * 2


def report(results: dict[str, Any]) -> list[str]:
    r = results
    lines = []
    for kv in ("f16", "q8_0"):
        t = r[f"ttft_{kv}"]
        lines.append(f"1. TTFT ({kv}, {t['prelude_tokens']}-token prelude + {t['prompt_tokens']}-token "
                     f"tail): cold {t['cold_s'] * 1000:.0f} ms, restored {t['restored_s'] * 1000:.1f} ms; "
                     f"cold/restored = {t['ratio_cold_over_restored']:.1f}x (target >= 30x)")
    state = r["llama_cpp_python_save_state"]
    for kv, target in (("f16", 1.05), ("q8_0", 0.55)):
        c = r[f"cache_{kv}"]
        lines.append(f"2. cache ({kv}): {c['bytes_per_token']:.0f} B/token; raw f16 KV "
                     f"{c['raw_f16_kv_bytes_per_token']} B/token: ratio {c['ratio_to_raw_f16']:.3f} "
                     f"(target <= {target}); Llama.save_state() {state['bytes_per_token']:.0f} B/token: "
                     f"ratio {c['bytes_per_token'] / state['bytes_per_token']:.3f}")
    base = r["workload_llama_cpp_python"]
    for kv in ("f16", "q8_0"):
        ours = r[f"workload_ours_{kv}"]
        for name in ("prompts_together", "prompts_one_at_a_time"):
            w = ours[name]
            lines.append(f"3. workload ({kv}, {name.replace('_', ' ')}): {w['tokens']} tokens in "
                         f"{w['seconds']:.2f} s = {w['tokens_per_s']:.1f} tok/s; llama-cpp-python loop "
                         f"{base['tokens_per_s']:.1f} tok/s ({base['tokens']} tokens): "
                         f"ratio {w['tokens_per_s'] / base['tokens_per_s']:.2f}x (target >= 1.6x)")
    decode = r["workload_ours_f16"]["decode"]
    one = decode["1_sequences_tokens_per_s"]
    for key, rate in decode.items():
        lines.append(f"4. decode ({key.split('_')[0]} sequences, f16): {rate:.1f} tok/s; "
                     f"ratio to 1 sequence {rate / one:.2f}x")
    b = r["workload_ours_f16"]["time_breakdown"]
    lines.append("5. where the workload's time goes (f16, prompts together): " + ", ".join(
        f"{k} {v * 1000:.0f} ms ({v / b['total'] * 100:.0f}%)" for k, v in b.items() if k != "total")
        + f"; total {b['total'] * 1000:.0f} ms")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads, both sides")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--model", type=Path, default=None, help="GGUF model (default: SmolLM2-135M)")
    args = parser.parse_args(argv)
    llama_cpp.llama_log_set(_quiet, llama_cpp.ctypes.c_void_p(0))
    sizes = QUICK if args.quick else FULL
    bench = Bench(sizes, args.threads, args.model or default_model_path())
    started = time.perf_counter()
    steps = [(f"time to first token and cache size ({kv})", bench.ttft_and_size, kv) for kv in ("f16", "q8_0")]
    steps += [("llama-cpp-python save_state", bench.llama_cpp_python_state, None),
              ("workload: llama-cpp-python loop", bench.workload_baseline, None)]
    steps += [(f"workload: ours ({kv})", bench.workload_ours, kv) for kv in ("f16", "q8_0")]
    for what, step, kv in steps:
        print(f"[{time.perf_counter() - started:6.0f}s] {what}", file=sys.stderr, flush=True)
        step(*([kv] if kv else []))
    results = {"meta": {"quick": args.quick, "threads": args.threads, "model": str(bench.model_path),
                        "sizes": asdict(sizes), "llama_cpp_python": llama_cpp.__version__,
                        "python": platform.python_version(), "machine": platform.machine(),
                        "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                        "seconds": time.perf_counter() - started,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
               **bench.results}
    for line in report(results):
        print(line)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"results written to {args.output}")
    return 0


@llama_cpp.llama_log_callback
def _quiet(level: int, text: bytes, user_data: Any) -> None:
    pass


if __name__ == "__main__":
    raise SystemExit(main())
