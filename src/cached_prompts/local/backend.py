"""The local backend: llama.cpp in this process, with the prelude cache on disk.

A request is evaluated as (the same steps whether or not the prelude came from the cache,
so cached and uncached outputs are bitwise identical):
  1. sequence 0 gets the prelude's state, `prelude[:-1]` (prelude_state.py);
  2. each prompt's branch copies the reusable part of it (`reusable_length`: all of it unless
     the joint tokenization changed the prelude's last tokens) into its own sequence and
     decodes the rest of its joint tokens, which leaves the logits of the first answer token;
  3. the outputs are decoded (generation.py). A greedy output is decoded alone: a batch of
     several sequences changes llama.cpp's arithmetic slightly. With `--draft auto` each wave
     gets its n-gram drafts (drafting.py): a greedy one from its own tokens only, a sampled one
     from every joint token and output of the request (and the prelude's pool, if asked).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cached_prompts.backend.interface import (Backend, BackendKind, Completion, Counters, GenerationRequest, PreludeKind,
                      PreludeLoad, ProgressCallback, StepCallback, StoredPrelude, TextCallback,
                      reusable_length)
from cached_prompts.cache.draft_pool import DraftPool
from cached_prompts.cache.store import CacheStore, meta_file
from cached_prompts.local import activity
from cached_prompts.local.drafting import DraftCost, Drafting
from cached_prompts.local.engine import (LLAMA_CPP_VERSION, Context, Model, check_context_limits,
                                         init_backend, resolve_gpu_layers, resolve_repack, state_settings)
from cached_prompts.errors import ConstraintError, StateUnusableError
from cached_prompts.local.generation import Branch, BranchText, generate_branches
from cached_prompts.local.model_file import fingerprint_model, resolve_model_path
from cached_prompts.local.sampler import SamplerChain
from cached_prompts.options import Draft, EngineOptions
from cached_prompts.local.prelude_state import PRELUDE_SEQ, PreludeStates

log = logging.getLogger(__name__)

DEFAULT_PARALLEL = 16
Wave = list[tuple[int, list[int | None]]]  # (job index, the seeds of that job decoded in this wave)


class LocalBackend(Backend):
    kind = BackendKind.LOCAL

    def __init__(self, options: EngineOptions, cache_dir: Path | None, *, verbose: bool = False,
                 n_parallel: int = DEFAULT_PARALLEL) -> None:
        # Sequence 0 holds the prelude; outputs take sequences 1..n_parallel.
        check_context_limits(options, n_parallel + 1)  # before the model loads: a bad flag fails fast
        model_path = resolve_model_path(options.model_path)
        init_backend(verbose)
        self.options = options
        self.model = Model(model_path, options.n_gpu_layers, repack=resolve_repack(options.repack))
        self.n_parallel = n_parallel
        self.context = Context(self.model, options, n_seq_max=n_parallel + 1)
        fingerprint = fingerprint_model(model_path, cache_dir)
        self._model_sha256 = fingerprint.sha256
        self.settings = state_settings(options, fingerprint.sha256)
        self.cache = (CacheStore(cache_dir, self.settings, str(model_path), max_bytes=options.cache_max_bytes)
                      if cache_dir else None)
        self.counters = Counters()
        self.states = PreludeStates(self.context, self.cache, self.counters)
        self._kept: dict[tuple[str, PreludeKind], tuple[list[int], str]] = {}  # -> (tokens, entry name)
        self.pool = DraftPool(self.cache.folder, self.cache.settings_key, self.model.n_vocab) if self.cache else None
        self.draft_cost = DraftCost.for_model(model_path.stat().st_size,
                                              on_gpu=resolve_gpu_layers(options.n_gpu_layers, warn=False) != 0)

    @property
    def drafts(self) -> str:
        """Whether outputs are decoded with n-gram drafts, and if not, why (the REPL's `info`)."""
        if self.options.draft == "off":
            return "off"
        if not self.model.architecture.memory.trims:
            return (f"off: a {self.model.architecture.memory.value} memory cannot drop the cells of "
                    "rejected drafts")
        return "auto"

    @property
    def draft(self) -> Draft:
        """As it decodes: "off" with --draft off and where the memory cannot draft (the same
        outputs), else "auto"."""
        return "auto" if self.drafts == "auto" else "off"

    # ----- what it is -----------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.options.n_ctx

    @property
    def model_name(self) -> str:
        return self.model.path.name

    @property
    def model_id(self) -> str:
        return self._model_sha256

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind.value, "model_path": str(self.model.path), "model_sha256": self.model_id,
                "context_length": self.n_ctx, "llama_cpp_python_version": LLAMA_CPP_VERSION,
                "architecture": self.model.architecture.name,
                "memory": self.model.architecture.memory.value, "device": self.settings.device,
                "drafts": self.drafts, "cache_dir": str(self.cache.folder) if self.cache else None,
                "cache_disk_reads": self.cache.disk_reads if self.cache else 0,
                "cache_disk_writes": self.cache.disk_writes if self.cache else 0}

    def close(self) -> None:
        self.context.close()
        self.model.close()

    def tokenize(self, text: str, *, at_start: bool) -> list[int]:
        return self.model.tokenize(text, at_start=at_start)

    # ----- prelude states ---------------------------------------------------------------------

    def prepare_prelude(self, tokens: list[int], label: str, *, kind: PreludeKind = PreludeKind.PRELUDE,
                        store: bool = True, on_prefill: ProgressCallback | None = None) -> PreludeLoad:
        return self.states.load(tokens, label, kind, store=store, on_prefill=on_prefill)

    def unload(self) -> None:
        """Forget the prelude held in memory: the next request restores or computes it."""
        self.states.unload()

    def keep_prelude(self, label: str, tokens: list[int], kind: PreludeKind) -> None:
        if len(tokens) < 2 or self.cache is None:
            return  # a one-token prelude has no state to store
        known = self._kept.get((label, kind))
        # The entry may have been evicted or dropped by another process meanwhile.
        if known is not None and known[0] == tokens and meta_file(self.cache.folder, known[1]).is_file():
            return
        entry = next((e for e in self.cache.entries() if e.label == label and e.kind is kind
                      and e.tokens == tokens), None)
        if entry is None:
            if self.states.loaded != tokens:
                self.prepare_prelude(tokens, label, kind=kind)
            entry = self.states.keep(label, kind, tokens)
        if entry is not None:
            self._kept[(label, kind)] = (list(tokens), entry.name)

    def check_grammar(self, grammar: str, source: str) -> None:
        activity.note(f"parsing the grammar of {source}")
        try:
            SamplerChain.check_grammar(self.model, grammar)
        except ConstraintError as error:
            raise ConstraintError(f"{source}: {error}") from None

    def kept_preludes(self, kind: PreludeKind) -> list[StoredPrelude]:
        if self.cache is None:
            return []
        entries = sorted((e for e in self.cache.entries() if e.kind is kind), key=lambda e: e.label)
        return [StoredPrelude(e.label, e.n_tokens, e.state_bytes) for e in entries]

    def drop_prelude(self, label: str, kind: PreludeKind) -> int:
        self._kept.pop((label, kind), None)
        if self.cache is None:
            return 0
        dropped = [e for e in self.cache.entries(all_settings=True) if e.kind is kind and e.label == label]
        for entry in dropped:
            self.cache.remove(entry)
        return len(dropped)

    # ----- log-probabilities of given tokens (score-preludes) ------------------------------------

    def token_pieces(self, tokens: list[int]) -> list[bytes]:
        added_bos = self.model.adds_bos and bool(tokens) and tokens[0] == self.model.bos
        return [b"" if index == 0 and added_bos else self.model.piece(token) for index, token in enumerate(tokens)]

    def token_logprobs(self, tokens: list[int], first: int, end: int, label: str, *,
                       store: bool = True) -> list[float]:
        """The part before `first` comes from the prelude's state (cache, prefix or computed
        and stored, as for a request), cut back to it, so the KV cells are laid out as in one
        pass over the whole prelude: llama.cpp's sums, and so the numbers, depend on that
        layout (measured: up to 0.4 nats on single tokens when other sequences' cells sit
        beside them). `store` False: see _shared_prefix_logprobs."""
        if not store:
            return self._shared_prefix_logprobs(tokens, first, end, label)
        start, kept = first - 1, 0
        try:
            self.unload()
            if start > 0:
                self.prepare_prelude(tokens, label)
                try:
                    self.context.seq_trim(PRELUDE_SEQ, start)
                    kept = start
                except StateUnusableError:  # a recurrent state cannot be cut: decode it all
                    self.unload()
            self.context.prefill(tokens, kept, start, PRELUDE_SEQ)
            return self.context.next_token_logprobs(tokens, first, end, PRELUDE_SEQ)
        finally:
            self.unload()  # sequence 0 no longer holds the prelude's state

    def _shared_prefix_logprobs(self, tokens: list[int], first: int, end: int, label: str) -> list[float]:
        """Nothing stored: sequence 0 gets the state of tokens[:first - 1] as a draft's (built on
        what it held, see prelude_state.py) and keeps it; the rows are decoded into another
        sequence, as a request's prompt is, so the cells' layout is a request's, not one pass's
        (the last digits may differ from the stored path's, the same way for every call)."""
        self.prepare_prelude(tokens[:first], label, kind=PreludeKind.DRAFT, store=False)
        seq = PRELUDE_SEQ + 1
        try:
            self.context.seq_copy(PRELUDE_SEQ, seq, first - 1)
            return self.context.next_token_logprobs(tokens, first, end, seq)
        finally:
            self.states.clear_outputs()

    # ----- outputs ------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, *, on_prefill: ProgressCallback | None = None,
                 on_step: StepCallback | None = None, on_text: TextCallback | None = None) -> list[list[Completion]]:
        """Greedy outputs are decoded alone; the sampled outputs of all jobs are decoded
        together, in waves that fit the sequences and the free KV cells."""
        prelude, jobs = request.prelude, request.jobs
        for job in jobs:
            self.check_fits(prelude, job.full)
        self.prepare_prelude(prelude, request.label, kind=request.kind, store=request.store,
                             on_prefill=on_prefill)
        budgets = [self.answer_budget(job.full, request.sampling, request.label) for job in jobs]
        outputs: list[dict[int | None, Completion]] = [{} for _ in jobs]
        counting = self._counting(on_step)
        made: list[list[int]] | None = [] if self.drafts == "auto" else None  # tokens of the outputs so far
        pool_entry = self._pool_entry(request) if made is not None else None
        pooled = self.pool.read(pool_entry) if pool_entry and request.draft_pool else []
        for index, job in enumerate(jobs):
            self.counters.prompt_tokens += len(job.full) - self._reused(prelude, job.full)
            if None in job.seeds:
                wave = [(index, [None])]
                outputs[index][None] = self._run_checked_wave(request, wave, budgets, counting,
                                                              _wave_text(request, wave, on_text), made)[0][0]
        for wave in self.plan_waves(request, budgets):
            completed = self._run_checked_wave(request, wave, budgets, counting, _wave_text(request, wave, on_text),
                                               made, pooled)
            for (index, _), completions in zip(wave, completed):
                outputs[index].update((c.seed, c) for c in completions)
        if pool_entry and made:
            self.pool.add(pool_entry, made)
        return [[outputs[i][seed] for seed in job.seeds] for i, job in enumerate(jobs)]

    def _reused(self, prelude: list[int], full: list[int]) -> int:
        """How much of the prelude's state a job starts from: what its joint tokens share with
        it, if the state can be cut there (Architecture.shortest_cut: a recurrent state only
        whole); else nothing, and the job's branch decodes all its tokens."""
        reused = reusable_length(prelude, full)
        return reused if reused >= self.model.architecture.shortest_cut(len(prelude) - 1) else 0

    def plan_waves(self, request: GenerationRequest, budgets: list[int]) -> list[Wave]:
        """The distinct sampled seeds of every job, packed in job order into waves that fit
        `n_parallel` sequences and the context's KV cells (the prelude's are shared); each
        wave is one decode loop. `budgets`: the most tokens per answer of each job."""
        waves: list[Wave] = []
        prelude = request.prelude
        free_cells = self.n_ctx - (len(prelude) - 1)
        seqs_left = cells_left = 0
        for index, job in enumerate(request.jobs):
            pending = list(dict.fromkeys(seed for seed in job.seeds if seed is not None))
            tail_cells = len(job.full) - self._reused(prelude, job.full)
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

    def _run_checked_wave(self, request: GenerationRequest, wave: Wave, budgets: list[int],
                          on_step: StepCallback, on_text: BranchText | None, made: list[list[int]] | None,
                          pooled: list[list[int]] | None = None) -> list[list[Completion]]:
        """A wave; if the prelude state in memory cannot give a branch what it needs (see
        Context.seq_copy), it is dropped and loaded again (restored or computed) once.
        `made` (None: no drafts) holds the tokens of the request's outputs so far; the wave's
        are added once it is done, so a retried wave drafts as the first try did."""
        try:
            return self._run_wave(request, wave, budgets, on_step, on_text, made, pooled)
        except StateUnusableError as error:
            log.info("%s: the prelude state in memory cannot be used (%s); loading it again", request.label, error)
            self.states.unload()
            self.prepare_prelude(request.prelude, request.label, kind=request.kind, store=request.store)
            return self._run_wave(request, wave, budgets, on_step, on_text, made, pooled)

    def _pool_entry(self, request: GenerationRequest) -> str | None:
        """The name of the cache entry whose draft pool the request reads and feeds."""
        if self.cache is None or not request.store:
            return None
        entry = self.cache.find_exact(request.prelude)
        return entry.name if entry is not None else None

    def _drafting(self, request: GenerationRequest, wave: Wave, made: list[list[int]] | None,
                  pooled: list[list[int]] | None) -> Drafting | None:
        """The wave's drafts: a greedy wave drafts from its own tokens only (generation.py
        gives it a private index); a sampled one from the pool it was given, then every joint
        token and output of the request so far (the latest occurrence of an n-gram wins)."""
        if made is None:
            return None
        drafting = Drafting(self.draft_cost)
        if any(seed is not None for _, seeds in wave for seed in seeds):
            drafting.add_sources(pooled or [])
            drafting.add_sources(job.full for job in request.jobs)
            drafting.add_sources(made)
        return drafting

    def _run_wave(self, request: GenerationRequest, wave: Wave, budgets: list[int], on_step: StepCallback,
                  on_text: BranchText | None, made: list[list[int]] | None,
                  pooled: list[list[int]] | None) -> list[list[Completion]]:
        self.states.clear_outputs()
        prelude = request.prelude
        fulls = [request.jobs[index].full for index, _ in wave]
        branches = [Branch(seeds, budgets[index], full, len(full), request.jobs[index].grammar)
                    for (index, seeds), full in zip(wave, fulls)]

        decoding = f"the decoding of the outputs for '{request.label}'"

        def decode_tail(branch: int, seq: int) -> None:
            full = fulls[branch]
            reused = self._reused(prelude, full)
            activity.note(f"the prefill of a prompt of '{request.label}' ({len(full) - reused} tokens)")
            self.context.seq_copy(PRELUDE_SEQ, seq, reused)
            self.context.prefill(full, reused, len(full), seq)

        def step(n: int) -> None:
            activity.note(decoding)
            counting(n)

        drafting = self._drafting(request, wave, made, pooled)
        counting = self._counting_drafts(drafting, on_step)
        tokens: list[list[int]] = []
        try:
            completions = generate_branches(self.context, self.model, branches, request.sampling, decode_tail,
                                            first_seq=PRELUDE_SEQ + 1, on_step=step,
                                            on_text=on_text, drafting=drafting, tokens_out=tokens)
        finally:
            self.states.clear_outputs()
        if made is not None:
            made += tokens
        return completions

    def _counting_drafts(self, drafting: Drafting | None, on_step: StepCallback) -> StepCallback:
        """Adds the wave's draft tokens to the counters as they are verified."""
        if drafting is None:
            return on_step
        seen = [0, 0]

        def count(n: int) -> None:
            totals = drafting.totals
            self.counters.drafted_tokens += totals.drafted - seen[0]
            self.counters.accepted_tokens += totals.accepted - seen[1]
            seen[:] = [totals.drafted, totals.accepted]
            on_step(n)
        return count

    def _counting(self, on_step: StepCallback | None) -> StepCallback:
        def count(n: int) -> None:
            self.counters.generated_tokens += n
            if on_step is not None:
                on_step(n)
        return count


def _wave_text(request: GenerationRequest, wave: Wave, on_text: TextCallback | None) -> BranchText | None:
    """A wave's text callback (branch, k) in terms of the request: (job, seed index). A seed
    that a job lists twice has one output, shown under each of its places."""
    if on_text is None:
        return None

    def text(branch: int, k: int, piece: str) -> None:
        job, seeds = wave[branch]
        listed = request.jobs[job].seeds
        for seed_index in (i for i, seed in enumerate(listed) if seed == seeds[k]):
            on_text(job, seed_index, piece)
    return text
