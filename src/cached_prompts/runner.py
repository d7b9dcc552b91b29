"""The runner: a loaded model and context plus the prelude cache, and the one path every
command and every REPL request takes to turn (prelude, prompt) into outputs.

How a request is evaluated (the same whether or not the prelude came from the cache, so
cached and uncached outputs are bitwise identical):
  1. sequence 0 gets the KV of the prelude's tokens except the last one, restored from the
     cache, built on the longest cached prefix, or computed in n_batch chunks;
  2. the prelude's last token and the prompt's tokens are decoded in one call, which leaves
     the logits from which every output's first token is sampled;
  3. the outputs are decoded (see generation.py). A greedy output is decoded alone: a
     batch of several sequences changes llama.cpp's arithmetic slightly.
Keeping the last prelude token out of the stored state means an entry needs no logits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp

from .cache import CacheStore, Entry, StateSettings
from .engine import Context, Model, init_backend
from .errors import ContextOverflowError, EngineError, InputFileError
from .generation import StepCallback, Wave, generate_wave
from .model_locator import fingerprint_model, resolve_model_path
from .options import EngineOptions, SamplingOptions

log = logging.getLogger(__name__)

DEFAULT_PARALLEL = 16
MIN_REUSED_PREFIX = 16
ProgressCallback = Callable[[int, int], None]


@dataclass
class PreludeLoad:
    """How a prelude's state was obtained."""

    source: str  # "memory", "cache", "prefix", "computed"
    reused_tokens: int
    computed_tokens: int
    entry: Entry | None = None


@dataclass
class Counters:
    """What the runner has done so far; tests and the REPL read these."""

    preludes_computed: int = 0
    prelude_tokens_computed: int = 0
    prelude_tokens_reused: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    sources: list[str] = field(default_factory=list)


class Runner:
    def __init__(self, options: EngineOptions, cache_dir: Path | None, *, verbose: bool = False,
                 n_parallel: int = DEFAULT_PARALLEL) -> None:
        model_path = resolve_model_path(options.model_path)
        init_backend(verbose)
        self.options = options
        self.model = Model(model_path)
        self.context = Context(self.model, options, n_seq_max=n_parallel)
        self.n_parallel = n_parallel
        fingerprint = fingerprint_model(model_path, cache_dir)
        self.settings = StateSettings(model_sha256=fingerprint.sha256, kv_type=options.kv_type,
                                      llama_cpp_version=llama_cpp.__version__)
        self.cache = CacheStore(cache_dir, self.settings, str(model_path)) if cache_dir else None
        self.counters = Counters()
        self._loaded: list[int] | None = None  # prelude tokens whose state seq 0 holds

    @property
    def n_ctx(self) -> int:
        return self.options.n_ctx

    def close(self) -> None:
        self.context.close()
        self.model.close()

    # ----- tokens -------------------------------------------------------------------

    def prelude_tokens(self, text: str, source: str) -> list[int]:
        if not text:
            raise InputFileError(f"{source} is empty; write the prelude's text into it")
        tokens = self.model.tokenize(text, at_start=True)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"{source} has {len(tokens)} tokens, the context only {self.n_ctx}; "
                "shorten it or raise --lp-n-ctx")
        return tokens

    def prompt_tokens(self, text: str) -> list[int]:
        return self.model.tokenize(text, at_start=False)

    def count_tokens(self, text: str, *, at_start: bool) -> int:
        return len(self.model.tokenize(text, at_start=at_start))

    # ----- prelude state ----------------------------------------------------------------

    def load_prelude(self, tokens: list[int], label: str, *, kind: str = "prelude",
                     store: bool = True, on_prefill: ProgressCallback | None = None) -> PreludeLoad:
        """Leave the state of tokens[:-1] in sequence 0 and nothing else in the context."""
        body = len(tokens) - 1
        if self._loaded == tokens:
            self._reset_to_prelude(body)
            return self._note(PreludeLoad("memory", body, 0))
        self._loaded = None
        self.context.clear()
        load = self._restore_cached(tokens) or self._compute(tokens, label, kind, store, on_prefill)
        self._loaded = list(tokens)
        return self._note(load)

    def _reset_to_prelude(self, body: int) -> None:
        for seq in range(1, self.n_parallel):
            self.context.seq_remove(seq)
        self.context.seq_trim(0, body)

    def _restore_cached(self, tokens: list[int]) -> PreludeLoad | None:
        if self.cache is None:
            return None
        entry = self.cache.find_exact(tokens)
        if entry is None or not self._restore(entry):
            return None
        return PreludeLoad("cache", len(tokens) - 1, 0, entry)

    def _restore(self, entry: Entry) -> bool:
        state = self.cache.load_state(entry) if self.cache else None
        if state is None:
            return False
        try:
            self.context.set_seq_state(state, 0)
        except EngineError as error:
            log.warning("cache entry %s could not be restored (%s); recomputing", entry.name, error)
            self.context.clear()
            return False
        return True

    def _compute(self, tokens: list[int], label: str, kind: str, store: bool,
                 on_prefill: ProgressCallback | None) -> PreludeLoad:
        body = len(tokens) - 1
        start, source, entry = 0, "computed", None
        prefix = self.cache.find_longest_prefix(tokens, MIN_REUSED_PREFIX) if self.cache else None
        if prefix is not None:
            entry, shared = prefix
            keep = min(shared, entry.n_tokens - 1, body)
            if keep >= MIN_REUSED_PREFIX and self._restore(entry):
                self.context.seq_trim(0, keep)
                start, source = keep, "prefix"
        self._prefill(tokens, start, body, on_prefill)
        self.counters.preludes_computed += 1
        if store and self.cache is not None and body > 0:
            entry = self.cache.store(label, kind, tokens, self.context.seq_state(0))
        return PreludeLoad(source, start, body - start, entry)

    def _prefill(self, tokens: list[int], start: int, end: int, on_prefill: ProgressCallback | None) -> None:
        step = self.options.n_batch
        for chunk_start in range(start, end, step):
            chunk_end = min(chunk_start + step, end)
            self.context.decode_sequence(tokens[chunk_start:chunk_end], chunk_start)
            if on_prefill is not None:
                on_prefill(chunk_end - start, end - start)

    def _note(self, load: PreludeLoad) -> PreludeLoad:
        self.counters.prelude_tokens_computed += load.computed_tokens
        self.counters.prelude_tokens_reused += load.reused_tokens
        self.counters.sources.append(load.source)
        return load

    # ----- outputs ------------------------------------------------------------------------

    def generate(self, prelude: list[int], prompt: list[int], sampling: SamplingOptions,
                 seeds: list[int | None], *, label: str, kind: str = "prelude", store: bool = True,
                 on_prefill: ProgressCallback | None = None,
                 on_step: StepCallback | None = None) -> list[str]:
        """One output per seed (None = greedy), in the order of `seeds`."""
        total = len(prelude) + len(prompt)
        if total >= self.n_ctx:
            raise ContextOverflowError(
                f"prelude + prompt take {len(prelude)} + {len(prompt)} = {total} tokens, the context "
                f"only {self.n_ctx}; shorten them or raise --lp-n-ctx")
        self.load_prelude(prelude, label, kind=kind, store=store, on_prefill=on_prefill)
        self.counters.prompt_tokens += len(prompt)
        budget = min(sampling.max_tokens, self.n_ctx - total)
        if budget < sampling.max_tokens:
            log.warning("%s: only %d tokens of context left for each answer (--max-tokens %d)",
                        label, budget, sampling.max_tokens)
        outputs: dict[int | None, str] = {}
        for wave_seeds in self._plan_waves(seeds, total, budget):
            self._decode_tail(prelude, prompt)
            texts = generate_wave(self.context, self.model, Wave(wave_seeds, budget), sampling,
                                  prelude + prompt, total, on_step=self._counting(on_step))
            outputs.update(zip(wave_seeds, texts))
        return [outputs[seed] for seed in seeds]

    def _plan_waves(self, seeds: list[int | None], used: int, budget: int) -> list[list[int | None]]:
        """One greedy output, decoded alone; the distinct sampled ones in groups that fit the
        sequences and the free KV cells."""
        fit = max(1, min(self.n_parallel, (self.n_ctx - used) // max(budget, 1)))
        greedy: list[list[int | None]] = [[None]] if None in seeds else []
        sampled = list(dict.fromkeys(seed for seed in seeds if seed is not None))
        return greedy + [list(sampled[i:i + fit]) for i in range(0, len(sampled), fit)]

    def _decode_tail(self, prelude: list[int], prompt: list[int]) -> None:
        body = len(prelude) - 1
        self._reset_to_prelude(body)
        tail = prelude[body:] + prompt
        step = self.options.n_batch
        for chunk_start in range(0, len(tail), step):
            self.context.decode_sequence(tail[chunk_start:chunk_start + step], body + chunk_start)

    def _counting(self, on_step: StepCallback | None) -> StepCallback:
        def count(n: int) -> None:
            self.counters.generated_tokens += n
            if on_step is not None:
                on_step(n)
        return count
