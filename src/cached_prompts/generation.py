"""The decode loop: several sequences sampled together from one shared prefix.

Sequence 0 of the context holds the prefix and the last decode left the logits of its
final token at row -1. Each wanted output gets its own sequence (KV cells shared with
`llama_memory_seq_cp`, not copied), its own sampler chain and seed; all active sequences
advance by one token per `llama_decode` call, and finished ones drop out of the batch.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .engine import Context, Model, SamplerChain
from .options import SamplingOptions

StepCallback = Callable[[int], None]


class TextCollector:
    """Turns token bytes into text without losing characters split across tokens, and
    stops at the first stop string (which is not kept)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self.stopped = False

    def add(self, piece: bytes) -> bool:
        """Append a token's bytes; True once a stop string has been seen."""
        new = self._decoder.decode(piece)
        if not new:
            return False
        search_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += new
        hits = [i for i in (self.text.find(s, search_from) for s in self._stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped


@dataclass
class Wave:
    """Outputs decoded together: one seed per sequence, None meaning greedy."""

    seeds: list[int | None]
    budget: int  # most tokens per output


def generate_wave(context: Context, model: Model, wave: Wave, sampling: SamplingOptions,
                  history: Sequence[int], first_position: int,
                  on_step: StepCallback | None = None) -> list[str]:
    """Sample `len(wave.seeds)` outputs as sequences 0..n-1 from the prefix in sequence 0."""
    count = len(wave.seeds)
    for seq in range(1, count):
        context.seq_copy(0, seq)
    recent = list(history[-sampling.repeat_last_n:]) if sampling.repeat_last_n else []
    samplers = []
    for seed in wave.seeds:
        chain = SamplerChain(model, sampling if seed is not None else sampling.as_greedy(), seed or 0)
        chain.remember(recent)
        samplers.append(chain)
    collectors = [TextCollector(sampling.stop) for _ in range(count)]
    rows = [-1] * count
    active = list(range(count))
    try:
        for step in range(wave.budget):
            tokens: list[int] = []
            seqs: list[int] = []
            for seq in active:
                token = samplers[seq].sample(context, rows[seq])
                if model.is_end(token) or collectors[seq].add(model.piece(token)):
                    continue
                tokens.append(token)
                seqs.append(seq)
            active = seqs
            if on_step is not None:
                on_step(len(tokens))
            if not active or step == wave.budget - 1:
                break
            context.decode_step(tokens, [first_position + step] * len(tokens), seqs)
            rows = [0] * count
            for row, seq in enumerate(seqs):
                rows[seq] = row
    finally:
        for chain in samplers:
            chain.close()
    return [c.text for c in collectors]
