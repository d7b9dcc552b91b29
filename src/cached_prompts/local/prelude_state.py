"""Prelude states of the local engine: how sequence 0 of the context comes to hold a
prelude's state, `prelude[:-1]` (see backend.py for why the last token is left out).

In order: the context already holds it (memory); an entry of exactly these tokens is restored
(cache); the state held in memory or the cache entry sharing the longest token prefix is kept
or restored, trimmed and the rest evaluated (prefix: candidate preludes that share a draft's
state, `pick`, are built on the one before without storing anything); or it is evaluated from
scratch in n_batch chunks (computed). Every path ends with
the same KV in sequence 0, which is why cached and uncached outputs are identical. Sequence 0
is never decoded into afterwards: outputs copy what they reuse of it into their own sequences.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

from cached_prompts.local import activity
from cached_prompts.local.architecture import MemoryKind
from cached_prompts.backend.interface import Counters, PreludeKind, PreludeLoad, PreludeSource, ProgressCallback, common_prefix_length
from cached_prompts.cache.store import CacheStore, Entry
from cached_prompts.local.engine import Context
from cached_prompts.errors import CacheError, EngineError

log = logging.getLogger(__name__)

PRELUDE_SEQ = 0
MIN_REUSED_PREFIX = 16


class PreludeStates:
    """Owns sequence 0 of a context: which prelude it holds and how it got there."""

    def __init__(self, context: Context, cache: CacheStore | None, counters: Counters) -> None:
        self.context = context
        self.cache = cache
        self.counters = counters
        self._loaded: list[int] | None = None  # prelude tokens whose state seq 0 holds

    @property
    def loaded(self) -> list[int] | None:
        return self._loaded

    def load(self, tokens: list[int], label: str, kind: PreludeKind, *, store: bool,
             on_prefill: ProgressCallback | None = None) -> PreludeLoad:
        """Leave the state of tokens[:-1] in sequence 0 and nothing else in the context."""
        body = len(tokens) - 1
        self.clear_outputs()
        if self._loaded == tokens:
            return self.counters.note_load(PreludeLoad(PreludeSource.MEMORY, body, 0))
        held, self._loaded = self._loaded, None  # seq 0 keeps its cells until a restore or compute
        if held is None:
            self.context.clear()
        load = self._restore_exact(tokens)
        if load is None:
            # Check again under the entry's lock: another process may have just stored it.
            lock = self.cache.entry_lock(tokens, label) if self.cache is not None and store else nullcontext()
            with lock:
                load = self._restore_exact(tokens) or self._compute(tokens, label, kind, store, on_prefill, held)
        self._loaded = list(tokens)
        return self.counters.note_load(load)

    def clear_outputs(self) -> None:
        """Drop every sequence but the prelude's."""
        for seq in range(PRELUDE_SEQ + 1, self.context.n_seq_max):
            self.context.seq_remove(seq)

    def unload(self) -> None:
        """Forget the prelude held in memory: the next load restores or computes it."""
        self._loaded = None
        self.context.clear()

    # ----- the four sources -------------------------------------------------------------------

    def _restore_exact(self, tokens: list[int]) -> PreludeLoad | None:
        if self.cache is None:
            return None
        entry = self.cache.find_exact(tokens)
        if entry is None or not self._restore(entry):
            return None
        return PreludeLoad(PreludeSource.CACHE, len(tokens) - 1, 0)

    def _restore(self, entry: Entry) -> bool:
        """Restore an entry into sequence 0. One that llama.cpp refuses is removed, so the
        recomputed state replaces it instead of failing again on every run."""
        state = self.cache.load_state(entry) if self.cache else None
        if state is None:
            return False
        activity.note(f"restoring the state of the prelude '{entry.label}' ({entry.n_tokens} tokens) from the cache")
        self.context.clear()  # what seq 0 held (a prefix not used) goes
        try:
            self.context.set_seq_state(state, PRELUDE_SEQ)
        except EngineError as error:
            self.context.clear()
            self.cache.discard_entry(entry, f"llama.cpp could not restore it: {error}; it is recomputed")
            return False
        return True

    def _compute(self, tokens: list[int], label: str, kind: PreludeKind, store: bool,
                 on_prefill: ProgressCallback | None, held: list[int] | None = None) -> PreludeLoad:
        body = len(tokens) - 1
        start, source = self._start_from_memory(tokens, body, held)
        if not start:
            start, source = self._start_from_prefix(tokens, body)
        activity.note(f"the prefill of the prelude '{label}' ({body - start} of its {len(tokens)} tokens)")
        self._prefill(tokens, start, body, on_prefill)
        self._settle()
        self.counters.preludes_computed += 1
        if store and self.cache is not None and body > 0:
            self._store(label, kind, tokens)
        return PreludeLoad(source, start, body - start)

    def _start_from_memory(self, tokens: list[int], body: int, held: list[int] | None) -> tuple[int, PreludeSource]:
        """Keep what seq 0 still holds of the prelude before (`held`), trimmed to the prefix it
        shares with `tokens`, if no cache entry gives more; (start, source), start 0 if not."""
        if held is None:
            return 0, PreludeSource.COMPUTED
        keep = self._usable_prefix(held, tokens, body)
        cached = self._prefix_entry(tokens, body)
        if keep == 0 or (cached is not None and cached[1] > keep):
            self.context.clear()
            return 0, PreludeSource.COMPUTED
        try:
            self.context.seq_trim(PRELUDE_SEQ, keep)
        except EngineError:  # a state that cannot be cut there: start afresh
            self.context.clear()
            return 0, PreludeSource.COMPUTED
        return keep, PreludeSource.PREFIX

    def _usable_prefix(self, stored_tokens: list[int], tokens: list[int], body: int) -> int:
        """How many tokens of a state of `stored_tokens[:-1]` a state of `tokens[:body]` can
        keep (0: too few to be worth it, or the state cannot be cut there)."""
        stored = len(stored_tokens) - 1
        keep = min(common_prefix_length(stored_tokens, tokens), stored, body)
        shortest = self.context.model.architecture.shortest_cut(stored)
        return keep if keep >= max(MIN_REUSED_PREFIX, shortest) else 0

    def _start_from_prefix(self, tokens: list[int], body: int) -> tuple[int, PreludeSource]:
        """Restore the cached entry sharing the longest prefix and trim it; (start, source)."""
        prefix = self._prefix_entry(tokens, body)
        if prefix is None:
            return 0, PreludeSource.COMPUTED
        entry, shared = prefix
        keep = min(shared, entry.n_tokens - 1, body)
        if keep < MIN_REUSED_PREFIX or not self._restore(entry):
            return 0, PreludeSource.COMPUTED
        try:
            self.context.seq_trim(PRELUDE_SEQ, keep)
        except EngineError as error:
            log.warning("could not reuse cache entry %s as a prefix (%s); computing from scratch",
                        entry.name, error)
            self.context.clear()
            return 0, PreludeSource.COMPUTED
        return keep, PreludeSource.PREFIX

    def _prefix_entry(self, tokens: list[int], body: int) -> tuple[Entry, int] | None:
        """The entry whose state gives the most of `tokens[:body]`, and how many tokens of it
        are kept. How far a stored state can be cut back depends on the model's memory
        (Architecture.shortest_cut): a recurrent state only whole, a sliding-window one only
        whole or less its last position once it is longer than the window."""
        if self.cache is None:
            return None
        usable = [(entry, keep) for entry in self.cache.entries()
                  if (keep := self._usable_prefix(entry.tokens, tokens, body))]
        return max(usable, key=lambda pair: pair[1], default=None)

    def _settle(self) -> None:
        """Make a computed sliding-window state look exactly as it does restored from the
        cache, which holds only the window's cells (see Architecture.shortest_cut): the
        outputs then see the same cells either way, so cached and uncached ones stay equal."""
        if self.context.memory_kind is MemoryKind.SWA and self.context.seq_length(PRELUDE_SEQ) > 0:
            state = self.context.seq_state(PRELUDE_SEQ)
            self.context.clear()
            self.context.set_seq_state(state, PRELUDE_SEQ)

    def _prefill(self, tokens: list[int], start: int, end: int, on_prefill: ProgressCallback | None) -> None:
        def progress(chunk_start: int, chunk_end: int) -> None:
            if on_prefill is not None:
                on_prefill(chunk_end - start, end - start)
        self.context.prefill(tokens, start, end, PRELUDE_SEQ, after_chunk=progress)

    def _store(self, label: str, kind: PreludeKind, tokens: list[int]) -> Entry | None:
        """Store sequence 0's state; a cache that cannot take it (a full disk) costs the
        entry, not the run."""
        activity.note(f"storing the state of the prelude '{label}'")
        try:
            return self.cache.store(label, kind, tokens, self.context.seq_state(PRELUDE_SEQ))
        except CacheError as error:
            log.warning("the state of %s was not stored: %s; going on without it", label, error)
            return None

    def keep(self, label: str, kind: PreludeKind, tokens: list[int]) -> Entry | None:
        """Store the loaded prelude `tokens` under `label` (the REPL's prelude_id)."""
        if self._loaded != tokens:
            raise EngineError("keep() needs the prelude loaded first; report this bug")
        return self._store(label, kind, tokens)
