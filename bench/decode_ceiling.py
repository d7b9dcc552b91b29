"""The most any llama.cpp client can reach on a workload: llama_decode alone, nothing else.

One context like our local backend's (a unified KV cache, the prelude in sequence 0), then
the same work as the workload without sampling, detokenizing or any protocol: each prompt's
tokens after the prelude decoded into its own sequence, each output sequence given a copy of
its prompt's state, and `max_tokens` steps that decode one (fixed) token for every output
sequence together.

Both llama-server and we run this same compute for a workload, plus our own overheads; so
ceiling / llama-server's best bounds the ratio any client could show against llama-server.
"""

from __future__ import annotations

from cached_prompts.backend.interface import reusable_length
from cached_prompts.local.engine import Context, Model
from cached_prompts.options import EngineOptions

FILLER_TOKEN = 1000  # what every step decodes; the cost of a step does not depend on it


class DecodeCeiling:
    """A context of its own on a loaded model (a backend's: the caller keeps it loaded) with
    the prelude decoded once; `run(prompts)` does a workload's llama_decode calls and returns
    the tokens it generated (outputs x max_tokens). Close it (or use `with`)."""

    def __init__(self, model: Model, options: EngineOptions, prelude: list[int], max_prompts: int,
                 outputs_per_prompt: int, max_tokens: int) -> None:
        self.prelude = prelude
        self.outputs_per_prompt, self.max_tokens = outputs_per_prompt, max_tokens
        self.context = Context(model, options, n_seq_max=max_prompts * (outputs_per_prompt + 1) + 1)
        # Like our backend: the stored state is prelude[:-1]; the joint tokens may split its end.
        stored = prelude[:-1]
        self.context.prefill(stored, 0, len(stored), 0)

    def run(self, prompts: list[list[int]]) -> int:
        """`prompts`: the joint tokens (prelude + prompt) of each prompt."""
        context = self.context
        prompt_seqs = list(range(1, len(prompts) + 1))
        output_seqs = list(range(len(prompts) + 1, len(prompts) * (self.outputs_per_prompt + 1) + 1))
        for seq, joint in zip(prompt_seqs, prompts):
            reused = reusable_length(self.prelude, joint)
            context.seq_copy(0, seq, reused)
            context.decode_sequence(joint[reused:], reused, seq)
        positions = []
        for i, seq in enumerate(output_seqs):
            prompt = i // self.outputs_per_prompt
            context.seq_copy(prompt_seqs[prompt], seq)
            positions.append(len(prompts[prompt]))
        for step in range(self.max_tokens):
            context.decode_step([FILLER_TOKEN] * len(output_seqs), [p + step for p in positions], output_seqs)
        for seq in [*prompt_seqs, *output_seqs]:
            context.seq_remove(seq)
        return len(output_seqs) * self.max_tokens

    def close(self) -> None:
        self.context.close()

    def __enter__(self) -> "DecodeCeiling":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
