"""The server backend's benchmark (issue #8), on local llama-server processes with the default model.

  .venv/bin/python bench/bench_server.py           # full sizes (a few minutes on 2 cores)
  .venv/bin/python bench/bench_server.py --quick   # tiny sizes: a smoke test of the script

1. Overhead: the workload of bench.py (a 1,459-token prelude, 3 prompts x 5 outputs x 48
   tokens, the CLI's default sampling) through one llama-server, our client
   (`ServerBackend.generate`) vs llama-server called directly with its best settings: the
   prelude warmed, then one `/completion` request per prompt with `n_cmpl` = 5, all three at
   once. Throughput = generated tokens / wall time, best of N, the two sides interleaved.
2. Affinity: with two servers, requests of several preludes (4 prompts each, shuffled) routed
   by rendezvous hashing (ours) vs to a random server; the prompt-cache hit rate is the share
   of the requests' prompt tokens the servers took from their caches (`timings.cache_n`).
   Each routing runs on freshly started servers.
Needs `make llama-server`. Writes bench/results/server.json (git-ignored).
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from tests.server_fixtures import LlamaServer  # noqa: E402
from server_args import server_bench_args  # noqa: E402
from workload import prelude as prelude_text, prompt as prompt_text  # noqa: E402

from cached_prompts.backend.interface import GenerationRequest, PromptJob  # noqa: E402
from cached_prompts.options import SamplingOptions, ServerOptions, derive_seed  # noqa: E402
from cached_prompts.server.api import CompletionAsk, ServerApi  # noqa: E402
from cached_prompts.server.http import HttpConnection  # noqa: E402
from cached_prompts.server.probe import probe  # noqa: E402
from cached_prompts.server.backend import ServerBackend  # noqa: E402
from cached_prompts.server.index import tokens_digest  # noqa: E402
from cached_prompts.server.routing import ServerState, rank_servers  # noqa: E402

RESULTS = REPO / "bench" / "results" / "server.json"


@dataclass
class Sizes:
    examples: int
    prompts: int
    outputs: int
    max_tokens: int
    repeats: int
    affinity_preludes: int
    affinity_prompts: int


FULL = Sizes(examples=11, prompts=3, outputs=5, max_tokens=48, repeats=3, affinity_preludes=6, affinity_prompts=4)
QUICK = Sizes(examples=1, prompts=2, outputs=2, max_tokens=4, repeats=1, affinity_preludes=2, affinity_prompts=2)


def start_server(binary: Path, folder: Path, threads: int, slots: int, ctx: int) -> LlamaServer:
    # `ctx` is shared by the slots: each gets ctx / slots tokens. Slot files as the README advises.
    slot_dir = Path(tempfile.mkdtemp(dir=folder, prefix="slots-"))
    server = LlamaServer(binary, folder, ctx=ctx, parallel=slots, threads=threads, slot_dir=slot_dir)
    return server.start()


# ----- 1. our client vs llama-server called directly -------------------------------------------------


def overhead(binary: Path, folder: Path, sizes: Sizes, threads: int) -> dict[str, float]:
    slots = sizes.prompts * sizes.outputs
    server = start_server(binary, folder, threads, slots, ctx=slots * 2048)
    try:
        backend = ServerBackend(ServerOptions(servers=[server.url]), folder / "llm_cache", fallback_n_ctx=2048)
        http = HttpConnection(server.url, timeout=600)
        try:
            return _compare(backend, probe(http, "llama"), sizes)
        finally:
            backend.close()
            http.close()
    finally:
        server.stop()


def _compare(backend: ServerBackend, client: ServerApi, sizes: Sizes) -> dict[str, float]:
    prelude = prelude_text(sizes.examples)
    prompts = [prompt_text(i) for i in range(sizes.prompts)]
    sampling = SamplingOptions(max_tokens=sizes.max_tokens)
    prelude_tokens = backend.tokenize(prelude, at_start=True)
    fulls = [backend.joint_tokens(prelude, p) for p in prompts]
    seeds = [derive_seed(0, k) for k in range(sizes.outputs)]
    backend.prepare_prelude(prelude_tokens, "bench")

    def ours() -> int:
        request = GenerationRequest(prelude_tokens, [PromptJob(full, list(seeds)) for full in fulls], sampling, "bench")
        return sum(c.tokens for job in backend.generate(request) for c in job)

    def ask(text: str) -> CompletionAsk:
        return CompletionAsk(text, sizes.outputs, sampling, sizes.max_tokens, seeds[0])

    def direct_together() -> int:
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(lambda text: client.complete(ask(text)), [prelude + p for p in prompts]))
        return sum(sum(a.tokens) for a in answers)

    def direct_one_by_one() -> int:
        return sum(sum(client.complete(ask(prelude + p)).tokens) for p in prompts)

    client.complete(CompletionAsk(prelude, 1, sampling, 0, None))  # warm
    runs = {"direct_together": direct_together, "direct_one_by_one": direct_one_by_one, "ours": ours}
    best = dict.fromkeys(runs, 0.0)
    for _ in range(sizes.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            tokens = run()
            best[name] = max(best[name], tokens / (time.perf_counter() - started))
    direct = max(best["direct_together"], best["direct_one_by_one"])
    return {"prelude_tokens": len(prelude_tokens), **{f"{k}_tok_s": round(v, 1) for k, v in best.items()},
            "ratio": round(best["ours"] / direct, 3)}


# ----- 2. prompt-cache hit rate: affinity vs random routing -------------------------------------------


def hit_rate(binary: Path, folder: Path, sizes: Sizes, threads: int, routing: str, seed: int = 1) -> dict[str, float]:
    servers = [start_server(binary, folder, threads, slots=2, ctx=4096) for _ in range(2)]
    connections = [HttpConnection(s.url, timeout=600) for s in servers]
    try:
        clients = [probe(http, "llama") for http in connections]
        states = [ServerState(http, api) for http, api in zip(connections, clients)]
        requests = []
        for p in range(sizes.affinity_preludes):
            # Different first words, so that the preludes share no prefix.
            prelude = prelude_text(max(1, sizes.examples // 3)).replace(
                "You are a storyteller.", f"You are storyteller number {p}.", 1)
            tokens = clients[0].tokenize(prelude, add_special=True)
            for i in range(sizes.affinity_prompts):
                requests.append((tokens_digest(tokens), prelude + prompt_text(i)))
        random.Random(seed).shuffle(requests)
        chooser = random.Random(seed + 1)
        greedy = SamplingOptions(temperature=0.0, max_tokens=4)
        cached = total = 0
        for digest, text in requests:
            state = rank_servers(states, digest)[0] if routing == "affinity" else chooser.choice(states)
            answer = _client(state).complete(CompletionAsk(text, 1, greedy, 4, None))
            cached += answer.cached_tokens or 0
            total += answer.prompt_tokens
        evaluated = sum(s.prompt_tokens() for s in servers)
        return {"hit_rate": round(cached / total, 3), "prompt_tokens": total, "evaluated_tokens": evaluated}
    finally:
        for http in connections:
            http.close()
        for server in servers:
            server.stop()


def _client(state: ServerState) -> ServerApi:
    if state.api is None:
        raise RuntimeError(f"{state.url} was not probed")
    return state.api


def main() -> int:
    args, binary = server_bench_args(__doc__, "threads per server", RESULTS)
    sizes = replace(QUICK if args.quick else FULL, **({"repeats": args.repeats} if args.repeats else {}))
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        results = {"sizes": asdict(sizes), "threads": args.threads,
                   "overhead": overhead(binary, work, sizes, args.threads),
                   "affinity": hit_rate(binary, work, sizes, args.threads, "affinity"),
                   "random": hit_rate(binary, work, sizes, args.threads, "random")}
    o, a, r = results["overhead"], results["affinity"], results["random"]
    print(f"{sizes.prompts} prompts x {sizes.outputs} outputs x {sizes.max_tokens} tokens, "
          f"{o['prelude_tokens']}-token prelude, one llama-server ({args.threads} threads):")
    print(f"  ours                       {o['ours_tok_s']:7.1f} tok/s")
    print(f"  direct, requests together  {o['direct_together_tok_s']:7.1f} tok/s (one per prompt, "
          f"n_cmpl={sizes.outputs}, prelude warmed)")
    print(f"  direct, one after another  {o['direct_one_by_one_tok_s']:7.1f} tok/s")
    print(f"  ratio to the better direct {o['ratio']:.3f}x (target >= 0.95x)")
    print(f"two servers, {sizes.affinity_preludes} preludes x {sizes.affinity_prompts} prompts, shuffled:")
    for name, figures in (("prelude affinity", a), ("random routing", r)):
        print(f"  {name:16s} prompt-cache hit rate {figures['hit_rate']:.1%}, prompt tokens evaluated "
              f"{figures['evaluated_tokens']} of {figures['prompt_tokens']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
