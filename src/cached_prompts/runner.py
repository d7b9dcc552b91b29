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
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp

from .cache import CacheStore, Entry, StateSettings
from .engine import Context, Model, init_backend
from .errors import ContextOverflowError, EngineError, InputFileError
from .generation import Branch, StepCallback, generate_branches
from .model_locator import fingerprint_model, resolve_model_path
from .options import EngineOptions, SamplingOptions

log = logging.getLogger(__name__)

DEFAULT_PARALLEL = 16
MIN_REUSED_PREFIX = 16
SOURCES_KEPT = 1000
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
    sources: list[str] = field(default_factory=list)  # of the last SOURCES_KEPT loads


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
        self.cache = (CacheStore(cache_dir, self.settings, str(model_path), max_bytes=options.cache_max_bytes)
                      if cache_dir else None)
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
        load = self._restore_cached(tokens)
        if load is None:
            # Check again under the entry's lock: another process may have just stored it.
            with self.cache.entry_lock(tokens, label) if self.cache is not None and store else nullcontext():
                load = self._restore_cached(tokens) or self._compute(tokens, label, kind, store, on_prefill)
        self._loaded = list(tokens)
        return self._note(load)

    def unload(self) -> None:
        """Forget the prelude held in memory: the next load restores or computes it."""
        self._loaded = None
        self.context.clear()

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
        del self.counters.sources[:-SOURCES_KEPT]  # a long-running REPL must not grow it forever
        return load

    # ----- outputs ------------------------------------------------------------------------

    def generate(self, prelude: list[int], prompt: list[int], sampling: SamplingOptions,
                 seeds: list[int | None], *, label: str, kind: str = "prelude", store: bool = True,
                 on_prefill: ProgressCallback | None = None,
                 on_step: StepCallback | None = None) -> list[str]:
        """One output per seed (None = greedy), in the order of `seeds`."""
        return self.generate_many(prelude, [prompt], sampling, [seeds], label=label, kind=kind,
                                  store=store, on_prefill=on_prefill, on_step=on_step)[0]

    def generate_many(self, prelude: list[int], prompts: list[list[int]], sampling: SamplingOptions,
                      seeds: list[list[int | None]], *, label: str, kind: str = "prelude",
                      store: bool = True, on_prefill: ProgressCallback | None = None,
                      on_step: StepCallback | None = None) -> list[list[str]]:
        """Outputs of several prompts of one prelude: for prompt i one output per seeds[i]
        (None = greedy). Greedy outputs are decoded alone; the sampled outputs of all prompts
        are decoded together, in waves that fit the sequences and the free KV cells."""
        if len(seeds) != len(prompts):
            raise EngineError(f"{len(prompts)} prompts but {len(seeds)} seed lists; report this bug")
        for prompt in prompts:
            self.check_fits(prelude, prompt)
        self.load_prelude(prelude, label, kind=kind, store=store, on_prefill=on_prefill)
        budgets = [self._budget(prelude, prompt, sampling, label) for prompt in prompts]
        outputs: list[dict[int | None, str]] = [{} for _ in prompts]
        for index, prompt in enumerate(prompts):
            self.counters.prompt_tokens += len(prompt)
            if None in seeds[index]:
                outputs[index][None] = self._run_wave(prelude, prompts, [(index, [None])], budgets,
                                                      sampling, on_step)[0][0]
        for wave in self._plan_waves(prelude, prompts, seeds, budgets):
            texts = self._run_wave(prelude, prompts, wave, budgets, sampling, on_step)
            for (index, wave_seeds), branch_texts in zip(wave, texts):
                outputs[index].update(zip(wave_seeds, branch_texts))
        return [[outputs[i][seed] for seed in seeds[i]] for i in range(len(prompts))]

    def check_fits(self, prelude: list[int], prompt: list[int]) -> None:
        total = len(prelude) + len(prompt)
        if total >= self.n_ctx:
            raise ContextOverflowError(
                f"prelude + prompt take {len(prelude)} + {len(prompt)} = {total} tokens, the context "
                f"only {self.n_ctx}; shorten them or raise --lp-n-ctx")

    def _budget(self, prelude: list[int], prompt: list[int], sampling: SamplingOptions, label: str) -> int:
        budget = min(sampling.max_tokens, self.n_ctx - len(prelude) - len(prompt))
        if budget < sampling.max_tokens:
            log.warning("%s: only %d tokens of context left for each answer (--max-tokens %d)",
                        label, budget, sampling.max_tokens)
        return budget

    def _plan_waves(self, prelude: list[int], prompts: list[list[int]], seeds: list[list[int | None]],
                    budgets: list[int]) -> list[list[tuple[int, list[int | None]]]]:
        """The distinct sampled seeds of every prompt, packed in prompt order into waves that
        fit `n_parallel` sequences and the context's KV cells (the prelude's are shared)."""
        waves: list[list[tuple[int, list[int | None]]]] = []
        free_cells = self.n_ctx - len(prelude)
        seqs_left = cells_left = 0
        for index, prompt in enumerate(prompts):
            pending = list(dict.fromkeys(seed for seed in seeds[index] if seed is not None))
            tail_cells = len(prompt) + 1
            while pending:
                fit = min(seqs_left, (cells_left - tail_cells) // budgets[index])
                if fit < 1:
                    waves.append([])
                    seqs_left, cells_left = self.n_parallel, free_cells
                    fit = max(1, min(seqs_left, (cells_left - tail_cells) // budgets[index]))
                chunk, pending = pending[:fit], pending[fit:]
                waves[-1].append((index, chunk))
                seqs_left -= len(chunk)
                cells_left -= tail_cells + len(chunk) * budgets[index]
        return waves

    def _run_wave(self, prelude: list[int], prompts: list[list[int]], wave: list[tuple[int, list[int | None]]],
                  budgets: list[int], sampling: SamplingOptions,
                  on_step: StepCallback | None) -> list[list[str]]:
        body = len(prelude) - 1
        self._reset_to_prelude(body)
        branches = [Branch(wave_seeds, budgets[index], prelude + prompts[index], len(prelude) + len(prompts[index]))
                    for index, wave_seeds in wave]

        def decode_tail(branch: int, seq: int) -> None:
            if seq:
                self.context.seq_copy(0, seq, body)
            tail = prelude[body:] + prompts[wave[branch][0]]
            step = self.options.n_batch
            for chunk_start in range(0, len(tail), step):
                self.context.decode_sequence(tail[chunk_start:chunk_start + step], body + chunk_start, seq)

        return generate_branches(self.context, self.model, branches, sampling, decode_tail,
                                 on_step=self._counting(on_step))

    def _counting(self, on_step: StepCallback | None) -> StepCallback:
        def count(n: int) -> None:
            self.counters.generated_tokens += n
            if on_step is not None:
                on_step(n)
        return count
