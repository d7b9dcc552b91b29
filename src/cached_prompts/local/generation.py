"""The decode loop: several sequences sampled together from shared prefixes.

Sequence 0 of the context holds the prelude. A wave is one or more branches, one per prompt:
the branch's tail (what its joint tokens add to the reused prelude state) is decoded into its
first sequence, built on a copy of sequence 0's cells,
its outputs share that KV through `llama_memory_seq_cp` (cells shared, not copied), and each
output has its own sequence, sampler chain and seed. The first token of a branch's outputs
is sampled right after its prompt is decoded (the next decode overwrites those logits);
then all outputs of all branches advance by one token per `llama_decode` call, and finished
ones drop out of the batch. With `drafting` (drafting.py), an output's step may also carry
draft tokens, verified in the same call (`_verify`).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cached_prompts.backend.interface import Completion, StepCallback, StopReason
from cached_prompts.local.drafting import DraftState, Drafting
from cached_prompts.local.engine import Context, Model
from cached_prompts.local.sampler import SamplerChain
from cached_prompts.options import SamplingOptions

TailDecoder = Callable[[int, int], None]  # (branch index, sequence) -> decode that branch's prompt
BranchText = Callable[[int, int, str], None]  # (branch index, output k of the branch, new text)


class TextCollector:
    """Turns token bytes into text without losing characters split across tokens, and
    stops at the first stop string (which is not kept)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self.stopped = False
        self.shown = 0  # how much of `text` was handed out while streaming (take_new)

    def add(self, piece: bytes) -> bool:
        """Append a token's bytes; True once a stop string has been seen."""
        return self._append(self._decoder.decode(piece))

    def finish(self) -> str:
        """The final text. Bytes of a character the last piece left incomplete become U+FFFD
        (as errors="replace" does) rather than vanish; nothing is added after a stop."""
        if not self.stopped:
            self._append(self._decoder.decode(b"", final=True))
        return self.text

    def take_new(self, final: bool = False) -> str:
        """Text added since the last call that no stop string can still cut off: while not
        final, the last len(longest stop) - 1 characters are held back."""
        end = len(self.text) if final or self.stopped else max(self.shown, len(self.text) - self._longest_stop + 1)
        new, self.shown = self.text[self.shown:end], end
        return new

    def _append(self, new: str) -> bool:
        if not new:
            return False
        search_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += new
        if not self._stops:
            return False
        hits = [i for i in (self.text.find(s, search_from) for s in self._stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped


@dataclass
class Branch:
    """The outputs of one prompt within a wave."""

    seeds: list[int | None]
    budget: int  # most tokens per output
    history: Sequence[int]  # prelude + prompt tokens, for the penalties
    position: int  # position of the first generated token
    grammar: str | None = None  # GBNF every output must match


class _Output:
    """One sequence being generated; `token` is the last sampled one, decoded next."""

    __slots__ = ("seq", "seed", "chain", "collector", "position", "left", "token", "count", "stop_reason",
                 "generated", "drafts")

    def __init__(self, seq: int, seed: int | None, chain: SamplerChain, collector: TextCollector,
                 position: int, budget: int) -> None:
        self.seq, self.seed, self.chain, self.collector = seq, seed, chain, collector
        self.position, self.left, self.token, self.count = position, budget, -1, 0
        self.stop_reason = StopReason.MAX_TOKENS  # unless the end token or a stop string comes first
        self.generated: list[int] = []  # every sampled token, the end token included
        self.drafts: DraftState | None = None

    def take(self, token: int, model: Model) -> bool:
        """Record a sampled token; True if it is part of the text (then `left` says
        whether it is to be decoded for another one)."""
        self.generated.append(token)
        if model.is_end(token) or self.collector.add(model.piece(token)):
            self.stop_reason = StopReason.END_TOKEN if model.is_end(token) else StopReason.STOP_STRING
            self.left = 0
            return False
        self.left -= 1
        self.count += 1
        self.token = token
        return True


def generate_branches(context: Context, model: Model, branches: Sequence[Branch], sampling: SamplingOptions,
                      decode_tail: TailDecoder, *, first_seq: int = 0, on_step: StepCallback | None = None,
                      on_text: BranchText | None = None, drafting: Drafting | None = None,
                      tokens_out: list[list[int]] | None = None) -> list[list[Completion]]:
    """Completions per branch, per seed. Sequences are numbered from `first_seq` in branch
    order; `decode_tail(b, seq)` must leave branch b's tail in `seq` and its logits at row -1.
    `on_text(b, k, text)` hears each output's text as it is decoded (the pieces add up to
    the completion's text). With `drafting`, outputs are decoded with draft tokens (a greedy
    branch's from its own tokens only); `tokens_out` receives each output's sampled tokens."""
    outputs: list[_Output] = []
    live: list[_Output] = []
    streamer = _Streamer(branches, on_text) if on_text is not None else None
    step = on_step if streamer is None else streamer.step_hook(outputs, on_step)
    try:
        for index, branch in enumerate(branches):
            first = first_seq + len(outputs)
            decode_tail(index, first)
            live += _start_branch(context, model, branch, sampling, first, outputs, step)
            if drafting is not None:
                private = all(seed is None for seed in branch.seeds)
                for output in outputs[first - first_seq:]:
                    output.drafts = drafting.start(branch.history, private=private)
        _decode_loop(context, model, live, step, drafting)
    finally:
        for output in outputs:
            output.chain.close()
    completions = [_completion(o) for o in outputs]
    if streamer is not None:
        streamer.flush(outputs, final=True)
    if tokens_out is not None:
        tokens_out += [o.generated for o in outputs]
    ordered = iter(completions)
    return [[next(ordered) for _ in branch.seeds] for branch in branches]


def _completion(output: _Output) -> Completion:
    drafts = output.drafts
    return Completion(output.collector.finish(), output.count, output.seed, output.stop_reason,
                      drafted_tokens=drafts.drafted if drafts else 0, accepted_tokens=drafts.accepted if drafts else 0)


class _Streamer:
    """Hands each output's new text to `on_text` after every decode step."""

    def __init__(self, branches: Sequence[Branch], on_text: BranchText) -> None:
        self._on_text = on_text
        self._where = [(b, k) for b, branch in enumerate(branches) for k in range(len(branch.seeds))]

    def step_hook(self, outputs: list[_Output], on_step: StepCallback | None) -> StepCallback:
        def step(taken: int) -> None:
            self.flush(outputs, final=False)
            if on_step is not None:
                on_step(taken)
        return step

    def flush(self, outputs: list[_Output], *, final: bool) -> None:
        for number, output in enumerate(outputs):
            new = output.collector.take_new(final)
            if new:
                self._on_text(*self._where[number], new)


def _start_branch(context: Context, model: Model, branch: Branch, sampling: SamplingOptions, first: int,
                  outputs: list[_Output], on_step: StepCallback | None) -> list[_Output]:
    """Create the branch's outputs and sample their first tokens; returns those that go on."""
    recent = list(branch.history[-sampling.repeat_last_n:]) if sampling.repeat_last_n else []
    going = []
    taken = 0
    for k, seed in enumerate(branch.seeds):
        seq = first + k
        if k:
            context.seq_copy(first, seq)
        chain = SamplerChain(model, sampling if seed is not None else sampling.as_greedy(), seed or 0,
                             branch.grammar)
        output = _Output(seq, seed, chain, TextCollector(sampling.stop), branch.position, branch.budget)
        outputs.append(output)
        chain.remember(recent)
        if output.take(chain.sample(context, -1), model):
            taken += 1
            if output.left:
                going.append(output)
    if on_step is not None:
        on_step(taken)
    return going


def _decode_loop(context: Context, model: Model, live: list[_Output], on_step: StepCallback | None,
                 drafting: Drafting | None) -> None:
    while live:
        drafts = _drafts(context, live, drafting)
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[int] = []
        for output, draft in zip(live, drafts):
            tokens += [output.token, *draft]
            positions += range(output.position, output.position + 1 + len(draft))
            seqs += [output.seq] * (1 + len(draft))
        context.decode_step(tokens, positions, seqs)
        going = []
        taken = row = 0
        for output, draft in zip(live, drafts):
            taken += _verify(context, model, output, draft, row)
            row += 1 + len(draft)
            if output.left:
                going.append(output)
        if on_step is not None:
            on_step(taken)
        live = going


def _drafts(context: Context, live: list[_Output], drafting: Drafting | None) -> list[list[int]]:
    """Each live output's draft tokens for this step (none without drafting). An output may
    sample `left` more tokens, so it drafts at most left - 1: its cells stay within its budget."""
    if drafting is None:
        return [[] for _ in live]
    states = [output.drafts for output in live]
    return drafting.propose(states, [o.generated for o in live], [o.left - 1 for o in live], context.n_batch)


def _verify(context: Context, model: Model, output: _Output, draft: list[int], row: int) -> int:
    """Sample the output's rows of the step (its last token's, then each draft token's) with
    its own chain, keeping drafts while the chain picks them (llama.cpp's rule: each token is
    still sampled from what the model says after the tokens kept before it). The cells of the
    rejected drafts are removed. Returns the tokens taken into the output."""
    start = output.position
    taken = accepted = 0
    for j in range(len(draft) + 1):
        token = output.chain.sample(context, row + j)
        if not output.take(token, model):
            break
        taken += 1
        if not output.left or j == len(draft) or token != draft[j]:
            break
        accepted += 1  # draft[j] was decoded at start + 1 + j: its row holds the next logits
    output.position = start + 1 + accepted
    if draft:
        output.drafts.note(len(draft), accepted)
        if output.left and accepted < len(draft):
            context.discard_cells(output.seq, output.position)
    return taken
