"""The batching REPL's benchmark (issue #11), with the default model, in one run:

  .venv/bin/python bench/bench_repl.py           # full sizes (a few minutes on 2 cores)
  .venv/bin/python bench/bench_repl.py --quick   # tiny sizes: a smoke test of the script

The workload of bench.py: a 1,459-token ChatML prelude, 3 prompts x 5 outputs x 48 tokens,
the CLI's default sampling. Measured on the same machine with the same thread count:

1. ours, one `single_prompt` request with `prompts: [3 prompts]` (decoded together);
2. ours, the same 3 prompts as 3 lines written at once to a service started with
   `--batch-waiting` (decoded together too; one answer line each);
3. ours, one prompt per request, each sent after the previous answer;
4. llama-server (as `make llama-server` builds it), its best: the prelude warmed, then one
   `/completion` request per prompt with `n_cmpl` = 5, all three at once, or one after another
   (the better of the two counts).

Each side has its prelude ready before timing (our precache; the server's prompt cache).
Throughput = generated tokens (stopped at EOS or the limit; our `info` counter, the server's
`tokens_predicted`) / wall time of the requests, best of N rounds, the runs interleaved.
Writes bench/results/repl.json (git-ignored). Timings on a shared machine are noisy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from tests.server_fixtures import LlamaServer  # noqa: E402
from server_args import server_bench_args  # noqa: E402
from workload import prelude as prelude_text, prompt as prompt_text  # noqa: E402

from cached_prompts.backend import BackendKind  # noqa: E402
from cached_prompts.options import SamplingOptions, derive_seed  # noqa: E402
from cached_prompts.server_api import ServerClient, sampling_fields  # noqa: E402

RESULTS = REPO / "bench" / "results" / "repl.json"
PRELUDE_ID = "bench"


@dataclass
class Sizes:
    examples: int
    prompts: int
    outputs: int
    max_tokens: int
    repeats: int


FULL = Sizes(examples=11, prompts=3, outputs=5, max_tokens=48, repeats=3)
QUICK = Sizes(examples=1, prompts=2, outputs=2, max_tokens=4, repeats=1)


class Repl:
    """Our `stdio-json-repl` in a child process; lines in, lines out."""

    def __init__(self, root: Path, threads: int, log: Any) -> None:
        command = [sys.executable, "-m", "cached_prompts.cli", "--root", str(root), "--n_threads", str(threads),
                   "-q", "stdio-json-repl", "--batch-waiting"]
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


def ours(repl: Repl, prelude: str, prompts: list[str], sizes: Sizes) -> dict[str, Callable[[], int]]:
    def counted(send: Callable[[], None]) -> Callable[[], int]:
        def run() -> int:
            before = repl.generated()
            send()
            return repl.generated() - before
        return run

    def prompts_request() -> None:
        repl.send([single_prompt(prelude, sizes, prompts=prompts)])

    def lines_at_once() -> None:
        repl.send([single_prompt(prelude, sizes, prompt=p) for p in prompts])

    def one_per_request() -> None:
        for p in prompts:
            repl.send([single_prompt(prelude, sizes, prompt=p)])

    return {"ours_prompts_request": counted(prompts_request), "ours_lines_batch_waiting": counted(lines_at_once),
            "ours_one_prompt_per_request": counted(one_per_request)}


def server_runs(client: ServerClient, prelude: str, prompts: list[str], sizes: Sizes) -> dict[str, Callable[[], int]]:
    kind = BackendKind.LLAMA_SERVER
    fields = sampling_fields(SamplingOptions(max_tokens=sizes.max_tokens), kind, max_tokens=sizes.max_tokens,
                             seed=derive_seed(0, 0))

    def complete(text: str) -> int:
        return sum(client.complete(kind, "", text, sizes.outputs, fields).tokens)

    def together() -> int:
        with ThreadPoolExecutor(len(prompts)) as pool:
            return sum(pool.map(complete, [prelude + p for p in prompts]))

    return {"server_together": together,
            "server_one_after_another": lambda: sum(complete(prelude + p) for p in prompts)}


def measure(runs: dict[str, Callable[[], int]], repeats: int) -> dict[str, float]:
    best = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            tokens = run()
            best[name] = max(best[name], tokens / (time.perf_counter() - started))
    return best


def main() -> int:
    args, binary = server_bench_args(__doc__, "threads on each side", RESULTS)
    sizes = QUICK if args.quick else FULL
    prelude = prelude_text(sizes.examples)
    prompts = [prompt_text(i) for i in range(sizes.prompts)]
    slots = sizes.prompts * sizes.outputs
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        server = LlamaServer(binary, work, ctx=slots * 2048, parallel=slots, threads=args.threads)
        with (work / "repl.log").open("wb") as log:
            repl = Repl(work, args.threads, log)
            try:
                server.start()
                client = ServerClient(server.url, timeout=600)
                prelude_tokens = repl.send([json.dumps({"command": "precache", "arguments": {
                    "prelude_id": PRELUDE_ID, "prelude": prelude}})])[0]["value"]["tokens"]
                warm = sampling_fields(SamplingOptions(), BackendKind.LLAMA_SERVER, max_tokens=0, seed=None)
                client.complete(BackendKind.LLAMA_SERVER, "", prelude, 1, warm)
                runs = {**ours(repl, prelude, prompts, sizes), **server_runs(client, prelude, prompts, sizes)}
                best = measure(runs, sizes.repeats)
                client.close()
            finally:
                server.stop()
                repl.close()
    server_best = max(best["server_together"], best["server_one_after_another"])
    results = {"sizes": asdict(sizes), "threads": args.threads, "prelude_tokens": prelude_tokens,
               **{f"{name}_tok_s": round(value, 1) for name, value in best.items()},
               "ratio_prompts_request": round(best["ours_prompts_request"] / server_best, 3),
               "ratio_lines_batch_waiting": round(best["ours_lines_batch_waiting"] / server_best, 3),
               "ratio_one_prompt_per_request": round(best["ours_one_prompt_per_request"] / server_best, 3)}
    print(f"{sizes.prompts} prompts x {sizes.outputs} outputs x {sizes.max_tokens} tokens, {prelude_tokens}-token "
          f"prelude, {args.threads} threads each, best of {sizes.repeats}:")
    n = sizes.prompts
    for name, label in (("ours_prompts_request", "ours, one request with prompts: [...]"),
                        ("ours_lines_batch_waiting", f"ours, {n} lines at once, --batch-waiting"),
                        ("ours_one_prompt_per_request", "ours, one prompt per request"),
                        ("server_together", f"llama-server, {n} requests (n_cmpl) at once"),
                        ("server_one_after_another", "llama-server, one request after another")):
        ratio = f"  {best[name] / server_best:.2f}x llama-server's best" if name.startswith("ours") else ""
        print(f"  {label:42s} {best[name]:7.1f} tok/s{ratio}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
