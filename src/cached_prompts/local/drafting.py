"""N-gram draft tokens (lookup speculative decoding) for the decode loop (generation.py).

A sequence's next tokens are guessed by lookup: the longest recent suffix of its tokens
(MIN_NGRAM..MAX_NGRAM tokens) that occurred earlier in a source, and what followed it there.
The decode loop verifies the guesses in the same `llama_decode` call as every other
sequence's step and keeps them while the sequence's own sampler chain picks them
(generation.py), so the drafts change how many decode calls an output takes, not what it is
sampled from.

Which sources an output may draft from decides what its bytes can depend on: llama.cpp's
sums depend slightly on the batch (how many rows), so a verified token can come out other in
its last bits than decoded alone, and a near-tie can go the other way (docs/drafts.md):
  - a greedy output drafts only from its own joint tokens and its own text, so it is a
    function of its inputs and options (cached == uncached, alone or with other prompts);
  - a sampled output also drafts from the other outputs of its request (it already depends on
    the request through the batch it is decoded in) and, where the request allows it
    (`GenerationRequest.draft_pool`), from the prelude's pool of earlier outputs on disk.

How many tokens to draft is decided by a fixed cost model (`DraftCost`, from the device and
the model's size, never from timings: a decision that depended on the machine's load would
make outputs depend on it) and each sequence's acceptance so far: a draft token is added
while it raises the expected tokens per unit of decode cost, so a sequence whose drafts are
mostly rejected stops drafting.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MIN_NGRAM = 2  # a one-token match guesses too often wrong to pay
MAX_NGRAM = 6
MAX_DRAFT = 8  # most draft tokens per sequence and step
PRIOR_ACCEPTANCE = 0.6  # what a sequence's first drafts are expected to keep, per token
PRIOR_WEIGHT = 3.0  # how many verified drafts that prior is worth
GPU_SLOPE = 0.05
# Extra cost of one more token in a decode, relative to a one-token decode, on this project's
# 2-core CPU (bench/bench_drafts.py): a 1.5B Q4_K_M model 0.33, SmolLM2-135M Q4_1 0.5. Bigger
# models are more bound by memory bandwidth: verifying a token costs them relatively less.
CPU_SLOPES = ((200 << 20, 0.5), (2 << 30, 0.35), (8 << 30, 0.25))
CPU_SLOPE_LARGE = 0.15


@dataclass(frozen=True)
class DraftCost:
    """Decode cost of n tokens in one call, in units of a one-token decode: 1 + slope (n - 1)."""

    slope: float

    @staticmethod
    def for_model(model_bytes: int, on_gpu: bool) -> "DraftCost":
        if on_gpu:
            return DraftCost(GPU_SLOPE)
        return DraftCost(next((slope for size, slope in CPU_SLOPES if model_bytes <= size), CPU_SLOPE_LARGE))

    def of(self, n_tokens: int) -> float:
        return 1.0 + self.slope * (n_tokens - 1)


class NgramIndex:
    """Where each n-gram of the indexed token lists was last followed by a token."""

    def __init__(self) -> None:
        # n-gram -> (the list it occurs in, index of the token that followed it)
        self._latest: dict[tuple[int, ...], tuple[list[int], int]] = {}

    def add(self, tokens: list[int], start: int = 1) -> None:
        """Index the tokens at positions >= start of `tokens` as continuations of the n-grams
        before them. The list may grow afterwards; index its new part with another add."""
        latest = self._latest
        for i in range(max(start, MIN_NGRAM), len(tokens)):
            for n in range(MIN_NGRAM, min(MAX_NGRAM, i) + 1):
                latest[tuple(tokens[i - n:i])] = (tokens, i)

    def lookup(self, history: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest indexed suffix of `history`."""
        if limit <= 0:
            return []
        for n in range(min(MAX_NGRAM, len(history)), MIN_NGRAM - 1, -1):
            hit = self._latest.get(tuple(history[-n:]))
            if hit is not None:
                source, at = hit
                return source[at:at + limit]
        return []


@dataclass
class DraftTotals:
    """Draft tokens verified and kept so far, over all outputs of a Drafting."""

    drafted: int = 0
    accepted: int = 0


@dataclass
class DraftState:
    """One output's drafting: the index it looks up in and adds its tokens to, its tokens
    (joint + generated) and how its drafts fared."""

    index: NgramIndex
    history: list[int]
    joint_length: int
    totals: "DraftTotals"
    drafted: int = 0
    accepted: int = 0
    rejected: int = 0  # steps whose drafts were cut by a token the sampler chose otherwise

    def acceptance(self) -> float:
        """Estimated chance that a draft token is kept once the ones before it were."""
        return (self.accepted + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (self.accepted + self.rejected + PRIOR_WEIGHT)

    def note(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.totals.drafted += drafted
        self.totals.accepted += accepted
        if accepted < drafted:
            self.rejected += 1

    def catch_up(self, generated: Sequence[int]) -> None:
        """Append the output's new tokens to its history and index them."""
        indexed = len(self.history)
        self.history.extend(generated[indexed - self.joint_length:])
        self.index.add(self.history, indexed)


@dataclass
class Drafting:
    """The drafts of one wave's outputs. Shared outputs look up in (and add to) one index of
    the wave's sources; a private one (greedy) gets an index of its joint tokens alone."""

    cost: DraftCost
    shared: NgramIndex = field(default_factory=NgramIndex)
    max_draft: int = MAX_DRAFT
    totals: DraftTotals = field(default_factory=DraftTotals)

    def add_sources(self, sources: Iterable[list[int]]) -> None:
        for tokens in sources:
            self.shared.add(tokens)

    def start(self, joint: Sequence[int], *, private: bool) -> DraftState:
        state = DraftState(NgramIndex() if private else self.shared, list(joint), len(joint), self.totals)
        if private:
            state.index.add(state.history)
        return state

    def propose(self, states: Sequence[DraftState], generated: Sequence[Sequence[int]],
                room: Sequence[int], capacity: int) -> list[list[int]]:
        """Draft tokens for each output: `generated` its tokens so far, `room` how many more it
        may sample after the next one, `capacity` the tokens one decode may take in all."""
        guesses = []
        for state, tokens, left in zip(states, generated, room):
            state.catch_up(tokens)
            guesses.append(state.index.lookup(state.history, min(self.max_draft, left)))
        return self._worth_verifying(states, guesses, capacity)

    def _worth_verifying(self, states: Sequence[DraftState], guesses: list[list[int]],
                         capacity: int) -> list[list[int]]:
        """Cut each guess to the draft tokens that raise the expected tokens per decode cost.

        Every sequence yields one token per step anyway; its j-th draft token adds one more
        with probability a^j (a: its acceptance). Candidates are taken best first while
        (tokens + gain) / cost(n + 1) > tokens / cost(n); gains fall and the throughput to
        beat rises, so the first that fails ends it."""
        candidates = []
        for i, (state, guess) in enumerate(zip(states, guesses)):
            a = state.acceptance()
            candidates += [(a ** j, i) for j in range(1, len(guess) + 1)]
        candidates.sort(key=lambda c: -c[0])  # stable: equal gains keep sequence order
        expected, n_tokens = float(len(states)), len(states)
        keep = [0] * len(states)
        for gain, i in candidates:
            if n_tokens >= capacity or (expected + gain) * self.cost.of(n_tokens) <= \
                    expected * self.cost.of(n_tokens + 1):
                break
            expected += gain
            n_tokens += 1
            keep[i] += 1
        return [guess[:k] for guess, k in zip(guesses, keep)]
