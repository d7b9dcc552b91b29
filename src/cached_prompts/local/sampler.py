"""The owner of a llama.cpp sampler chain: `SamplerChain`, built from SamplingOptions, a seed
and an optional grammar, freed on close(). Grammar sampler creation also checks grammars
(llama.cpp reports a grammar's parse error only on stderr, captured here)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence

import llama_cpp

from cached_prompts.errors import ConstraintError
from cached_prompts.local.engine import Context, Model
from cached_prompts.local.grammar_limits import check_grammar_size
from cached_prompts.options import SamplingOptions

MIROSTAT_M = 100
MAX_CAPTURED_BYTES = 1 << 16


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Callable[[], list[str]]]:
    """What C code writes to file descriptor 2 meanwhile (llama.cpp's grammar parser prints
    its errors there, not through the log callback); the lines, after the block."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines += sink.read(MAX_CAPTURED_BYTES).decode("utf-8", errors="replace").splitlines()


class SamplerChain:
    """A llama.cpp sampler chain built from SamplingOptions, one seed and, optionally, a
    grammar that every output must match."""

    def __init__(self, model: Model, options: SamplingOptions, seed: int, grammar: str | None = None) -> None:
        self._chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._grammar_index: int | None = None
        add = self._add
        if options.repeat_penalty != 1.0 or options.frequency_penalty or options.presence_penalty:
            add(llama_cpp.llama_sampler_init_penalties(
                model.n_vocab, options.repeat_last_n, options.repeat_penalty,
                options.frequency_penalty, options.presence_penalty))
        if grammar is not None:
            # Before top-k & co.: they must choose among the tokens the grammar allows.
            self._grammar_index = llama_cpp.llama_sampler_chain_n(self._chain)
            add(self.grammar_sampler(model, grammar))
        if options.greedy:
            add(llama_cpp.llama_sampler_init_greedy())
        elif options.mirostat_mode:
            add(llama_cpp.llama_sampler_init_temp(options.temperature))
            if options.mirostat_mode == 1:
                add(llama_cpp.llama_sampler_init_mirostat(
                    model.n_vocab, seed, options.mirostat_tau, options.mirostat_eta, MIROSTAT_M))
            else:
                add(llama_cpp.llama_sampler_init_mirostat_v2(seed, options.mirostat_tau, options.mirostat_eta))
        else:
            if options.top_k > 0:
                add(llama_cpp.llama_sampler_init_top_k(options.top_k))
            add(llama_cpp.llama_sampler_init_top_p(options.top_p, 1))
            if options.min_p > 0:
                add(llama_cpp.llama_sampler_init_min_p(options.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(options.temperature))
            add(llama_cpp.llama_sampler_init_dist(seed))

    def _add(self, sampler: llama_cpp.llama_sampler_p) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    @staticmethod
    def grammar_sampler(model: Model | None, grammar: str) -> llama_cpp.llama_sampler_p:
        """A grammar sampler (root rule `root`); ConstraintError with llama.cpp's reason if
        the grammar does not parse (llama.cpp prints that reason on stderr: it is captured).
        A grammar that would overflow llama.cpp's recursive parser is refused first. Without a
        model (None) the sampler can only be freed: llama.cpp's parser does not use the
        vocabulary, so that checks a grammar meant for a server."""
        check_grammar_size(grammar, "the grammar")
        with _captured_stderr() as captured:
            sampler = llama_cpp.llama_sampler_init_grammar(model.vocab if model else None, grammar.encode("utf-8"),
                                                           b"root")
        if not sampler:
            reason = next((line.split("error parsing grammar:", 1)[1].strip() for line in captured()
                           if "error parsing grammar:" in line), "")
            raise ConstraintError(f"llama.cpp cannot use the grammar{f' ({reason})' if reason else ''}; "
                                  "it must be GBNF with a rule named root and every rule it uses defined, "
                                  "not left-recursive")
        return sampler

    @staticmethod
    def check_grammar(model: Model | None, grammar: str) -> None:
        """ConstraintError (with llama.cpp's reason) unless llama.cpp can use `grammar`."""
        llama_cpp.llama_sampler_free(SamplerChain.grammar_sampler(model, grammar))

    def remember(self, tokens: Sequence[int]) -> None:
        """Feed earlier tokens to the penalties, as if they had been sampled (not to the
        grammar: it constrains the answer, not the prompt)."""
        if self._grammar_index is None:
            targets = [self._chain]
        else:
            targets = [llama_cpp.llama_sampler_chain_get(self._chain, i)
                       for i in range(llama_cpp.llama_sampler_chain_n(self._chain)) if i != self._grammar_index]
        for target in targets:
            for token in tokens:
                llama_cpp.llama_sampler_accept(target, token)

    def sample(self, context: Context, index: int) -> int:
        """Sample (and accept) a token from the logits of batch row `index`."""
        return llama_cpp.llama_sampler_sample(self._chain, context.handle, index)

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:
        self.close()
