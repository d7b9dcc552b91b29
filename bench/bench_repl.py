"""The batching REPL's benchmark (issue #11), with the default model, in one run:

  .venv/bin/python bench/bench_repl.py                       # full sizes (about 7 minutes on 2 cores)
  .venv/bin/python bench/bench_repl.py --kv-type q8_0-keys   # K in q8_0 on both sides
  .venv/bin/python bench/bench_repl.py --quick               # tiny sizes: a smoke test of the script

The workload of bench.py: a 1,459-token ChatML prelude, 3 prompts x 5 outputs x 48 tokens,
the CLI's default sampling. Measured on the same machine with the same thread count:

1. ours, one `single_prompt` request with `prompts: [3 prompts]` (decoded together);
2. ours, the same 3 prompts as 3 lines written at once to a service started with
   `--batch-waiting` (decoded together too; one answer line each);
3. ours, one prompt per request, each sent after the previous answer;
4. llama-server (as `make llama-server` builds it), its best: two servers, one with its
   defaults (flash attention "auto", one KV stream per slot) and one with `-fa off -kvu`
   (a unified KV cache, as ours); on each the prelude warmed, then one `/completion` request
   per prompt with `n_cmpl` = 5, all three at once, or one after another. Its best is the
   fastest of the four;
5. the ceiling: llama_decode alone on the same work (bench/decode_ceiling.py): what no
   client of llama.cpp can beat here with this KV type, so ceiling / llama-server's best
   bounds any client's ratio.

Each side has its prelude ready before timing (our precache; the server's prompt cache).
Throughput = generated tokens (stopped at EOS or the limit; our `info` counter, the server's
`tokens_predicted`) / wall time of the requests, best of --repeats rounds, the runs
interleaved. Writes bench/results/repl.json (git-ignored). The 2-core machines here switch
between a slow and a fast phase (the same llama_decode loop measured 142 and 183 tok/s
minutes apart), so take the ratios of one run, never figures from two runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from tests.server_fixtures import LlamaServer  # noqa: E402
from server_args import server_bench_args  # noqa: E402
from workload import prelude as prelude_text, prompt as prompt_text  # noqa: E402

from decode_ceiling import DecodeCeiling  # noqa: E402

from cached_prompts.local.backend import LocalBackend  # noqa: E402
from cached_prompts.options import EngineOptions, SamplingOptions, derive_seed  # noqa: E402
from cached_prompts.server.api import CompletionAsk, ServerApi  # noqa: E402
from cached_prompts.server.http import HttpConnection  # noqa: E402
from cached_prompts.server.probe import probe  # noqa: E402

RESULTS = REPO / "bench" / "results" / "repl.json"
PRELUDE_ID = "bench"


@dataclass
class Sizes:
    examples: int
    prompts: int
    outputs: int
    max_tokens: int
    repeats: int


FULL = Sizes(examples=11, prompts=3, outputs=5, max_tokens=48, repeats=5)
QUICK = Sizes(examples=1, prompts=2, outputs=2, max_tokens=4, repeats=1)


class Repl:
    """Our `stdio-json-repl` in a child process; lines in, lines out."""

    def __init__(self, root: Path, threads: int, kv_type: str, log: Any) -> None:
        command = [sys.executable, "-m", "cached_prompts", "--root", str(root), "--n_threads", str(threads),
                   "--kv-type", kv_type, "-q", "stdio-json-repl", "--batch-waiting"]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)

    def send(self, lines: list[str]) -> list[dict[str, Any]]:
        """Write all lines at once, then read one answer per line."""
        self.process.stdin.write("".join(line + "\n" for line in lines).encode("utf-8"))
        self.process.stdin.flush()
        answers = [json.loads(self.process.stdout.readline()) for _ in lines]
        failed = [a["message"] for a in answers if a["status"] != "Ok"]
        if failed:
            raise RuntimeError(f"the service refused a request: {failed[0]}")
        return answers

    def generated(self) -> int:
        return self.send([json.dumps({"command": "info"})])[0]["value"]["counters"]["generated_tokens"]

    def close(self) -> None:
        """EOF ends the service; killed if it does not end."""
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def single_prompt(prelude: str, sizes: Sizes, **arguments: Any) -> str:
    return json.dumps({"command": "single_prompt", "arguments": {
        "prelude_id": PRELUDE_ID, "prelude": prelude, "number_of_random_outputs": sizes.outputs,
        "inference_parameters": {"max_tokens": sizes.max_tokens}, **arguments}})


# A run: given the prompts (new ones each time: no side may reuse a prompt it saw before), it
# makes their outputs and returns how many tokens were generated.
Run = Callable[[list[str]], int]


def ours(repl: Repl, prelude: str, sizes: Sizes) -> dict[str, Run]:
    def counted(send: Callable[[list[str]], None]) -> Run:
        def run(prompts: list[str]) -> int:
            before = repl.generated()
            send(prompts)
            return repl.generated() - before
        return run

    def prompts_request(prompts: list[str]) -> None:
        repl.send([single_prompt(prelude, sizes, prompts=prompts)])

    def lines_at_once(prompts: list[str]) -> None:
        repl.send([single_prompt(prelude, sizes, prompt=p) for p in prompts])

    def one_per_request(prompts: list[str]) -> None:
        for p in prompts:
            repl.send([single_prompt(prelude, sizes, prompt=p)])

    return {"ours_prompts_request": counted(prompts_request), "ours_lines_batch_waiting": counted(lines_at_once),
            "ours_one_prompt_per_request": counted(one_per_request)}


# llama-server's configurations tried: its defaults, and a unified KV cache (which needs no
# flash attention to be fast on these CPUs); the flags for each --kv-type are added to both.
SERVER_CONFIGS = {"server_default": (), "server_unified": ("-fa", "off", "-kvu")}
# (q8_0's V needs flash attention: its "-fa on", last, overrides the unified server's "-fa off".)
SERVER_KV_FLAGS = {"f16": (), "q8_0-keys": ("-ctk", "q8_0"), "q8_0": ("-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on")}


def server_runs(config: str, client: ServerApi, prelude: str, sizes: Sizes) -> dict[str, Run]:
    sampling = SamplingOptions(max_tokens=sizes.max_tokens)

    def complete(text: str) -> int:
        return sum(client.complete(CompletionAsk(text, sizes.outputs, sampling, sizes.max_tokens,
                                                 derive_seed(0, 0))).tokens)

    def together(prompts: list[str]) -> int:
        with ThreadPoolExecutor(len(prompts)) as pool:
            return sum(pool.map(complete, [prelude + p for p in prompts]))

    return {f"{config}_together": together,
            f"{config}_one_after_another": lambda prompts: sum(complete(prelude + p) for p in prompts)}


def measure(runs: dict[str, Run], sizes: Sizes) -> dict[str, float]:
    """Best tokens/s of each run over `sizes.repeats` rounds, the runs interleaved; every call
    gets prompts of its own variant."""
    best = dict.fromkeys(runs, 0.0)
    variant = 0
    for _ in range(sizes.repeats):
        for name, run in runs.items():
            prompts = [prompt_text(i, variant) for i in range(sizes.prompts)]
            variant += 1
            started = time.perf_counter()
            tokens = run(prompts)
            best[name] = max(best[name], tokens / (time.perf_counter() - started))
    return best


def start_servers(stack: ExitStack, binary: Path, work: Path, sizes: Sizes, threads: int, kv_type: str,
                  prelude: str) -> dict[str, ServerApi]:
    """Each configuration's server, started (stopped by `stack`) and its prelude warmed; idle
    servers use no CPU."""
    slots = sizes.prompts * sizes.outputs
    clients: dict[str, ServerApi] = {}
    for config, flags in SERVER_CONFIGS.items():
        server = LlamaServer(binary, work, ctx=slots * 2048, parallel=slots, threads=threads,
                             extra_args=(*flags, *SERVER_KV_FLAGS[kv_type]))
        stack.callback(server.stop)
        server.start()
        http = HttpConnection(server.url, timeout=600)
        stack.callback(http.close)
        clients[config] = probe(http, "llama")
        clients[config].complete(CompletionAsk(prelude, 1, SamplingOptions(), 0, None))  # warm
    return clients


def ceiling_run(ceiling: DecodeCeiling, tokenizer: LocalBackend, prelude: str) -> Run:
    """llama_decode alone on the prompts' joint tokens (tokenized as our backend does)."""
    return lambda prompts: ceiling.run([tokenizer.joint_tokens(prelude, p) for p in prompts])


def main() -> int:
    args, binary = server_bench_args(__doc__, "threads on each side", RESULTS, kv_types=tuple(SERVER_KV_FLAGS))
    sizes = replace(QUICK if args.quick else FULL, **({"repeats": args.repeats} if args.repeats else {}))
    prelude = prelude_text(sizes.examples)
    with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
        work = Path(folder)
        log = stack.enter_context((work / "repl.log").open("wb"))
        repl = Repl(work, args.threads, args.kv_type, log)
        stack.callback(repl.close)
        prelude_tokens = repl.send([json.dumps({"command": "precache", "arguments": {
            "prelude_id": PRELUDE_ID, "prelude": prelude}})])[0]["value"]["tokens"]
        options = EngineOptions(n_threads=args.threads, kv_type=args.kv_type)
        tokenizer = stack.enter_context(LocalBackend(options, None))
        decode_alone = stack.enter_context(DecodeCeiling(tokenizer.model, options, tokenizer.prelude_tokens(
            prelude, PRELUDE_ID), sizes.prompts, sizes.outputs, sizes.max_tokens))
        runs = ours(repl, prelude, sizes)
        for config, client in start_servers(stack, binary, work, sizes, args.threads, args.kv_type, prelude).items():
            runs.update(server_runs(config, client, prelude, sizes))
        runs["ceiling_llama_decode"] = ceiling_run(decode_alone, tokenizer, prelude)
        best = measure(runs, sizes)
    report(best, sizes, args, prelude_tokens)
    return 0


LABELS = {"ours_prompts_request": "ours, one request with prompts: [...]",
          "ours_lines_batch_waiting": "ours, {n} lines at once, --batch-waiting",
          "ours_one_prompt_per_request": "ours, one prompt per request",
          "server_default_together": "llama-server defaults, {n} requests at once",
          "server_default_one_after_another": "llama-server defaults, one after another",
          "server_unified_together": "llama-server -fa off -kvu, {n} at once",
          "server_unified_one_after_another": "llama-server -fa off -kvu, one after another",
          "ceiling_llama_decode": "llama_decode alone (the ceiling)"}


def report(best: dict[str, float], sizes: Sizes, args: Any, prelude_tokens: int) -> None:
    server_best = max(value for name, value in best.items() if name.startswith("server_"))
    ratios = {f"ratio_{name}": round(value / server_best, 3) for name, value in best.items()
              if not name.startswith("server_")}
    results = {"sizes": asdict(sizes), "threads": args.threads, "kv_type": args.kv_type,
               "prelude_tokens": prelude_tokens, **{f"{name}_tok_s": round(value, 1) for name, value in best.items()},
               "server_best_tok_s": round(server_best, 1), **ratios}
    print(f"{sizes.prompts} prompts x {sizes.outputs} outputs x {sizes.max_tokens} tokens, {prelude_tokens}-token "
          f"prelude, KV {args.kv_type}, {args.threads} threads each, best of {sizes.repeats}:")
    for name, value in best.items():
        ratio = "" if name.startswith("server_") else f"  {value / server_best:.2f}x llama-server's best"
        print(f"  {LABELS[name].format(n=sizes.prompts):44s} {value:7.1f} tok/s{ratio}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
