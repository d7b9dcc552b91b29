"""What the worker process costs (issue 15): `stdio-json-repl` with the local engine in a worker
process (the default) against the same service with `--lp-engine-process in-process`, in one run:

  .venv/bin/python bench/bench_worker.py             # the REPL benchmark's sizes, 3 rounds (a few minutes)
  .venv/bin/python bench/bench_worker.py --quick     # tiny sizes: a smoke test of the script

The workload of bench_repl.py (a ChatML prelude of few-shot stories, new prompts every request,
the CLI's default sampling), precached on both sides first; measured per side:
  - one `single_prompt` request with `prompts: [...]`, and one prompt per request, in tokens/s
    (generated tokens from the service's own `info` counters / wall time), best of the rounds;
  - many tiny `count_tokens` requests: the time of one round trip, where the pipe to the
    worker is all the difference.
The sides alternate within each round, so a slow phase of the machine hits both. Prints the
ratios worker / in-process (1.0 = no overhead) and writes bench/results/worker.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from workload import prelude as prelude_text, prompt as prompt_text  # noqa: E402

RESULTS = REPO / "bench" / "results" / "worker.json"
SIDES = {"worker": (), "in_process": ("--lp-engine-process", "in-process")}


@dataclass
class Sizes:
    examples: int
    prompts: int
    outputs: int
    max_tokens: int
    repeats: int
    round_trips: int


FULL = Sizes(examples=11, prompts=3, outputs=5, max_tokens=48, repeats=3, round_trips=300)
QUICK = Sizes(examples=1, prompts=2, outputs=2, max_tokens=4, repeats=1, round_trips=20)


class Service:
    """One `stdio-json-repl` child; lines in, answers out."""

    def __init__(self, root: Path, threads: int, side_flags: tuple[str, ...], log: Any) -> None:
        command = [sys.executable, "-m", "cached_prompts", "--root", str(root), "--n_threads", str(threads),
                   *side_flags, "-q", "stdio-json-repl"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"),
                                                                           os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env)

    def ask(self, command: str, **arguments: Any) -> Any:
        self.process.stdin.write((json.dumps({"command": command, "arguments": arguments}) + "\n").encode())
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        if answer["status"] != "Ok":
            raise RuntimeError(f"the service refused a request: {answer['message']}")
        return answer["value"]

    def generated(self) -> int:
        return self.ask("info")["counters"]["generated_tokens"]

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def tokens_per_second(service: Service, prelude: str, prompts: list[str], sizes: Sizes, together: bool) -> float:
    common = {"prelude_id": "bench", "prelude": prelude, "number_of_random_outputs": sizes.outputs,
              "inference_parameters": {"max_tokens": sizes.max_tokens}}
    before = service.generated()
    started = time.perf_counter()
    if together:
        service.ask("single_prompt", **common, prompts=prompts)
    else:
        for prompt in prompts:
            service.ask("single_prompt", **common, prompt=prompt)
    seconds = time.perf_counter() - started
    return (service.generated() - before) / seconds


def round_trip_ms(service: Service, sizes: Sizes) -> float:
    started = time.perf_counter()
    for i in range(sizes.round_trips):
        service.ask("count_tokens", text=f"a short text number {i}")
    return (time.perf_counter() - started) / sizes.round_trips * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default: 3; --quick: 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of each side")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes.repeats = args.repeats
    prelude = prelude_text(sizes.examples)
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
        log = stack.enter_context((Path(folder) / "services.log").open("wb"))
        services = {}
        for side, flags in SIDES.items():
            (Path(folder) / side).mkdir()
            services[side] = Service(Path(folder) / side, args.threads, flags, log)
            stack.callback(services[side].close)
            services[side].ask("precache", prelude_id="bench", prelude=prelude)
        variant = 0
        for _ in range(sizes.repeats):
            for kind, together in (("prompts_request", True), ("one_prompt_per_request", False)):
                for side, service in services.items():
                    variant += 1
                    prompts = [prompt_text(i, variant) for i in range(sizes.prompts)]
                    rate = tokens_per_second(service, prelude, prompts, sizes, together)
                    key = f"{side}_{kind}_tok_s"
                    best[key] = max(best.get(key, 0.0), rate)
            for side, service in services.items():
                key = f"{side}_round_trip_ms"
                best[key] = min(best.get(key, float("inf")), round_trip_ms(service, sizes))
    report(best, sizes, args.threads)
    return 0


def report(best: dict[str, float], sizes: Sizes, threads: int) -> None:
    ratios = {f"ratio_{kind}": best[f"worker_{kind}_tok_s"] / best[f"in_process_{kind}_tok_s"]
              for kind in ("prompts_request", "one_prompt_per_request")}
    extra_ms = best["worker_round_trip_ms"] - best["in_process_round_trip_ms"]
    print(f"{sizes.prompts} prompts x {sizes.outputs} outputs x {sizes.max_tokens} tokens, "
          f"{sizes.examples}-example prelude, {threads} threads, best of {sizes.repeats}:")
    for kind in ("prompts_request", "one_prompt_per_request"):
        print(f"  {kind:24s} worker {best[f'worker_{kind}_tok_s']:7.1f} tok/s, in-process "
              f"{best[f'in_process_{kind}_tok_s']:7.1f} tok/s: ratio {ratios[f'ratio_{kind}']:.3f}")
    print(f"  count_tokens round trip  worker {best['worker_round_trip_ms']:.3f} ms, in-process "
          f"{best['in_process_round_trip_ms']:.3f} ms: {extra_ms:+.3f} ms per request through the worker")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"sizes": asdict(sizes), "threads": threads,
                                   **{k: round(v, 3) for k, v in best.items()},
                                   **{k: round(v, 4) for k, v in ratios.items()}}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
