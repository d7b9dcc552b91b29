"""`pick` with reuse against the same work without it, in the same run.

The workload (the issue's): a draft of about 1,400 tokens (few-shot stories, workload.py),
5 candidate answers, 3 test prompts with expectations, 5 sampled outputs each of up to 48
tokens. Ours: `pick` as shipped (the draft's state computed once, every candidate built on
it). The peer: the same `pick` call on a backend that forgets the prelude state before every
request, so each candidate prelude is computed from scratch. Both use the same seeds, so they
make the same outputs (checked) and do the same decoding; the difference is the prelude work.

    python bench/bench_pick.py [--repeats 1] [--threads N] [--model PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload  # noqa: E402

from cached_prompts.backend.interface import GenerationRequest  # noqa: E402
from cached_prompts.commands.pick import PickResult, pick  # noqa: E402
from cached_prompts.local.backend import LocalBackend  # noqa: E402
from cached_prompts.options import EngineOptions, SamplingOptions  # noqa: E402
from cached_prompts.workspace.layout import Workspace  # noqa: E402

DRAFT_EXAMPLES = 12  # about 1,400 tokens with SmolLM2's tokenizer
CANDIDATES = [
    "In a bell tower above the market there lived a bell ringer who knew every rope by its voice.",
    "Once upon a time, a bell ringer rang the bells.",
    "The bell ringer was old. He rang the bells each morning, and the town woke to them.",
    "In a quiet mountain village there lived a bell ringer who counted the swallows every spring, "
    "and wrote their number on the wall beside the great bell.",
    "Bells! Bells everywhere! The bell ringer loved them all, big and small.",
]
TEST_TOPICS = ["mountain guide", "bookbinder", "tea merchant"]
EXPECTATIONS = ('[[expect]]\nname = "opens like the examples"\nregex = "^In [a-z]"\n'
                '[[expect]]\nnot_contains = "Once upon a time"\n')


def make_workspace(root: Path) -> None:
    draft = workload.prelude(DRAFT_EXAMPLES) + f"{workload.user_turn('bell ringer')}<|im_end|>\n<|im_start|>assistant\n"
    files = {"prelude_drafts/story.txt": draft, "preludes/story.expect.toml": EXPECTATIONS}
    for k, answer in enumerate(CANDIDATES):
        files[f"prelude_drafts_outputs/story.output-{k}.txt"] = answer
    for topic in TEST_TOPICS:
        files[f"test_prompts/story---{topic.replace(' ', '-')}.txt"] = (
            f"{workload.user_turn(topic)}<|im_end|>\n<|im_start|>assistant\n")
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


class FromScratch(LocalBackend):
    """The peer: no prelude state survives from one request to the next."""

    def generate(self, request: GenerationRequest, **kwargs: Any):  # type: ignore[override]
        self.unload()
        return super().generate(request, **kwargs)

    def token_logprobs(self, *args: Any, **kwargs: Any) -> list[float]:
        self.unload()
        return super().token_logprobs(*args, **kwargs)


def run(backend: LocalBackend, root: Path, sampling: SamplingOptions) -> tuple[float, PickResult]:
    started = time.perf_counter()
    result = pick(Workspace(root), backend, "story", sampling, n=5)
    return time.perf_counter() - started, result


def summary(result: PickResult) -> list[tuple[int, int, int]]:
    return [(c.key, c.passed, c.total) for c in result.candidates]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side (best time kept)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads, both sides")
    parser.add_argument("--model", type=Path, default=None, help="GGUF model (default: SmolLM2-135M)")
    args = parser.parse_args()
    options = EngineOptions(n_ctx=4096, n_threads=args.threads,
                            **({"model_path": str(args.model)} if args.model else {}))
    sampling = SamplingOptions(max_tokens=48, seed=7)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_workspace(root)
        ours, peer = LocalBackend(options, None), FromScratch(options, None)
        try:
            draft_tokens = len(ours.prelude_tokens((root / "prelude_drafts/story.txt").read_text(), "draft"))
            times: dict[str, list[float]] = {"ours": [], "peer": []}
            results: dict[str, PickResult] = {}
            for _ in range(args.repeats):
                for name, backend in (("ours", ours), ("peer", peer)):
                    backend.unload()
                    seconds, results[name] = run(backend, root, sampling)
                    times[name].append(seconds)
            counters = {name: b.counters for name, b in (("ours", ours), ("peer", peer))}
        finally:
            ours.close()
            peer.close()
    same = summary(results["ours"]) == summary(results["peer"])
    print(f"pick: draft {draft_tokens} tokens, {len(CANDIDATES)} candidates x {len(TEST_TOPICS)} test prompts x "
          f"5 outputs x up to 48 tokens; {args.threads} threads; best of {args.repeats}")
    for name in ("ours", "peer"):
        c = counters[name]
        print(f"  {name}: {min(times[name]):7.2f} s   prelude tokens computed {c.prelude_tokens_computed:6d}, "
              f"reused {c.prelude_tokens_reused:6d}, generated {c.generated_tokens:5d}")
    print(f"  ratio (peer / ours): {min(times['peer']) / min(times['ours']):.2f}x; same ranking and pass counts: {same}")
    print(f"  ranking: {summary(results['ours'])}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
