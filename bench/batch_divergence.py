"""How often an output changes with the batch it is decoded in (README, "Speed").

llama.cpp's arithmetic depends slightly on the batch (how many rows, which KV cells), so
the same seed can give a different output alone, with the other outputs of its prompt, or
with the outputs of several prompts. This counts, for the benchmark's prelude and prompts:
  - sampled: each seed alone vs in its prompt's batch of N vs in the batch of all P*N;
  - greedy: K greedy copies of a prompt in one batch vs the greedy output decoded alone.

  .venv/bin/python bench/batch_divergence.py [--quick] [--kv-type q8_0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import FULL, QUICK, RESULTS, Bench  # noqa: E402

from cached_prompts.backend.interface import GenerationRequest, PromptJob, reusable_length  # noqa: E402
from cached_prompts.local.generation import Branch, generate_branches  # noqa: E402
from cached_prompts.local.prelude_state import PRELUDE_SEQ  # noqa: E402

GREEDY_COPIES = 4


def differing(reference: list[str], other: list[str]) -> dict[str, object]:
    diffs = [i for i, (a, b) in enumerate(zip(reference, other)) if a != b]
    prefixes = [len(os.path.commonprefix([reference[i], other[i]])) for i in diffs]
    return {"outputs": len(reference), "differ": len(diffs),
            "first_difference_at_char": prefixes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--kv-type", default="f16", choices=["f16", "q8_0"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", type=Path, default=RESULTS.with_name("batch_divergence.json"))
    args = parser.parse_args(argv)
    from cached_prompts.local.model_file import default_model_path
    bench = Bench(QUICK if args.quick else FULL, args.threads, default_model_path())
    runner = bench.runner(args.kv_type, None)
    prelude = runner.prelude_tokens(bench.prelude, "bench prelude")
    prompts = [runner.joint_tokens(bench.prelude, p) for p in bench.prompts]
    sampling, seeds = bench.sampling, bench.seeds

    def texts(fulls: list[list[int]], options, job_seeds: list) -> list[list[str]]:
        request = GenerationRequest(prelude, [PromptJob(full, list(job_seeds)) for full in fulls], options, "b")
        return [[c.text for c in completions] for completions in runner.generate(request)]

    alone = [texts([p], sampling, [seed])[0][0] for p in prompts for seed in seeds]
    per_prompt = [text for p in prompts for text in texts([p], sampling, seeds)[0]]
    together = [text for outputs in texts(prompts, sampling, seeds) for text in outputs]
    greedy = sampling.as_greedy()
    greedy_alone, greedy_batched = [], []
    for full in prompts:
        greedy_alone.append(texts([full], greedy, [None])[0][0])
        # Several greedy copies in one batch: what the backend never does (it decodes them alone).
        runner.prepare_prelude(prelude, "b")
        reused = reusable_length(prelude, full)
        runner.context.seq_copy(PRELUDE_SEQ, PRELUDE_SEQ + 1, reused)
        runner.context.decode_sequence(full[reused:], reused, PRELUDE_SEQ + 1)
        branch = Branch([None] * GREEDY_COPIES, sampling.max_tokens, full, len(full))
        copies = generate_branches(runner.context, runner.model, [branch], greedy, lambda b, s: None,
                                   first_seq=PRELUDE_SEQ + 1)[0]
        greedy_batched += [c.text for c in copies]
    runner.close()
    results = {
        "kv_type": args.kv_type, "max_tokens": sampling.max_tokens, "prompts": len(prompts), "seeds": len(seeds),
        "sampled_alone_vs_prompt_batch": differing(alone, per_prompt),
        "sampled_alone_vs_all_prompts_batch": differing(alone, together),
        "sampled_prompt_batch_vs_all_prompts_batch": differing(per_prompt, together),
        f"greedy_alone_vs_{GREEDY_COPIES}_copies_in_one_batch": differing(
            [text for text in greedy_alone for _ in range(GREEDY_COPIES)], greedy_batched)}
    for key, value in results.items():
        if isinstance(value, dict):
            print(f"{key}: {value['differ']} of {value['outputs']} outputs differ "
                  f"(first difference at character {value['first_difference_at_char']})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
