"""The server backend: tokenization and generation on llama-server or OpenAI-compatible
(vLLM) servers instead of this process (server/api.py: the client of one server, one class per
protocol, chosen when it is probed; server/routing.py picks which server).

- Token ids are sent, so a server sees exactly the tokens the local engine would.
- A prelude's requests go to one server (rendezvous hashing of its tokens), where its KV stays
  in the server's prompt cache. Before the first request of a stored prelude on a server the
  prelude alone is evaluated there (a "warm-up", no output), so that the prompts sent together
  afterwards all start from it instead of each computing it.
- Persistent preludes: on a llama-server started with --slot-save-path, a warmed-up prelude's
  slot is saved under a name derived from the model and the prelude's tokens, and restored on
  a later run (for example after the server restarted) instead of being computed again.
- N outputs of a prompt are one request (`n`); the server evaluates the prompt once. Both
  llama-server and vLLM give the j-th of n completions the request's seed + j, so output K
  of a prompt is sampled with seed S + K, where S is the seed derived for output 0
  (options.derive_seed). Like the local seeds, that is stable, distinct per K and independent
  of how many outputs are made; it is not the local engine's seed for K > 0.
- A server that fails is marked down; its outputs move to the next server of the prelude's
  ranking. Outputs no server can make are each a FailedOutput of `generate_results`
  (`generate`, all or nothing, raises IncompleteOutputsError).
- A schema or grammar (PromptJob.grammar / json_schema) is sent with each request, in the
  form the server's protocol takes (server/llama_api.py, server/openai_api.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cached_prompts.backend.interface import (Backend, BackendKind, Completion, Counters, FailedOutput,
                                              GenerationRequest, OutputResult, PreludeKind, PreludeLoad, PreludeSource,
                                              ProgressCallback, StepCallback, StoredPrelude, TextCallback)
from cached_prompts.errors import IncompleteOutputsError, ServerDownError, ServerError
from cached_prompts.options import SamplingOptions, ServerOptions
from cached_prompts.server.api import CompletionAsk, Generated, ServerApi
from cached_prompts.server.http import HttpConnection
from cached_prompts.server.probe import probe
from cached_prompts.server.index import ServerIndex, slot_file_name, tokens_digest
from cached_prompts.server.routing import ServerPool, ServerState

log = logging.getLogger(__name__)

OPENAI_DEFAULT_PARALLEL = 8
# When every server of a ranking is down, work waits for their back-offs until each has failed
# this many times in a row; then it is given up (and later work tries each server once).
FAILURES_BEFORE_GIVING_UP = 3
MAX_WORKERS = 64


@dataclass
class _Part:
    """Outputs of one job that go in one request: greedy (one), or sampled with seeds
    first_seed + offset, offset + 1, ..."""

    job: int
    positions: list[int]  # where its completions go in the job's list
    greedy: bool
    first_seed: int = 0
    offset: int = 0
    done: list[Completion] = field(default_factory=list)


class ServerBackend(Backend):
    def __init__(self, options: ServerOptions, cache_dir: Path | None, *, fallback_n_ctx: int) -> None:
        if not options.servers:
            raise ServerError("no server given; pass --server URL (or set servers in cached-prompts.toml)")
        self.options = options
        self.counters = Counters()
        self.index = ServerIndex(cache_dir) if cache_dir is not None else None
        per_server = options.server_parallel or OPENAI_DEFAULT_PARALLEL
        states = [ServerState(HttpConnection(url, timeout=options.server_timeout, max_connections=per_server + 4))
                  for url in options.servers]
        self.pool = ServerPool(states)
        self._lock = threading.Lock()  # counters, progress callbacks, warm-up bookkeeping
        self._warm: dict[tuple[str, str], threading.Lock] = {}
        self._warmed: dict[tuple[str, str], int] = {}  # -> slots given the prelude
        try:
            self._model_id = self._probe_all(states)
        except BaseException:
            self.close()
            raise
        self.kind = (BackendKind.LLAMA_SERVER if all(s.info is None or s.info.kind is BackendKind.LLAMA_SERVER
                                                     for s in states) else BackendKind.OPENAI)
        known = [s.info.n_ctx for s in states if s.info is not None and s.info.n_ctx]
        self._n_ctx = min(known) if known else fallback_n_ctx
        if not known:
            log.info("the servers do not say their context length; assuming --lp-n-ctx %d", fallback_n_ctx)

    # ----- what it is -------------------------------------------------------------------------

    def _probe_all(self, states: list[ServerState]) -> str:
        errors = []
        for state in states:
            try:
                self._probe(state)
            except ServerDownError as error:
                self.pool.mark_down(state, error)
                errors.append(str(error))
        models = {s.info.model_id for s in states if s.info is not None}
        if not models:
            raise ServerDownError("no server can be used: " + "; ".join(errors))
        if len(models) > 1:
            served = ", ".join(f"{s.url} serves {s.info.model_id}" for s in states if s.info is not None)
            raise ServerError(f"the servers serve different models ({served}); give servers that serve one model")
        return models.pop()

    def _probe(self, state: ServerState) -> None:
        api = probe(state.http, self.options.server_api)
        info = api.info
        if getattr(self, "_model_id", None) not in (None, info.model_id):
            raise ServerDownError(f"{state.url} now serves {info.model_id}, not {self._model_id}")
        state.api = api
        state.capacity = self.options.server_parallel or info.slots or OPENAI_DEFAULT_PARALLEL
        log.debug("%s: %s, model %s, n_ctx %s, %d outputs at a time", state.url, info.kind.value,
                  info.model_id, info.n_ctx, state.capacity)

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def model_name(self) -> str:
        return self._model_id

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def context_hint(self) -> str:
        return ("use servers with a longer context (llama-server -c N, which its --parallel slots share; "
                f"vLLM --max-model-len N): the servers' n_ctx is {self._n_ctx}")

    def describe(self) -> dict[str, Any]:
        return {"backend": self.kind.value, "model_id": self._model_id, "context_length": self._n_ctx,
                "servers": [self._describe_server(s) for s in self.pool.servers]}

    def _describe_server(self, state: ServerState) -> dict[str, Any]:
        info = state.info
        return {"url": state.url, "api": info.kind.value if info else None, "n_ctx": info.n_ctx if info else None,
                "slots": state.capacity, "up": self.pool.is_up(state), "last_error": state.last_error}

    def close(self) -> None:
        for state in self.pool.servers:
            state.http.close()

    # ----- tokens -------------------------------------------------------------------------------

    def tokenize(self, text: str, *, at_start: bool) -> list[int]:
        """On the first server that answers (they serve one model, so any tokenizes alike)."""
        def call(state: ServerState, granted: int) -> list[int]:
            return _api(state).tokenize(text, add_special=at_start)
        return self._on_a_server(self.pool.servers, 1, call)

    # ----- preludes -----------------------------------------------------------------------------

    def prepare_prelude(self, tokens: list[int], label: str, *, kind: PreludeKind = PreludeKind.PRELUDE,
                        store: bool = True, on_prefill: ProgressCallback | None = None) -> PreludeLoad:
        ranking = self.pool.ranking(tokens_digest(tokens))

        def call(state: ServerState, granted: int) -> PreludeLoad:
            return self._warm_up(state, tokens, label, store=store, again=True)
        load = self._on_a_server(ranking, 1, call)
        if on_prefill is not None and load.computed_tokens:
            on_prefill(load.computed_tokens, load.computed_tokens)
        return load

    def _warm_up(self, state: ServerState, tokens: list[int], label: str, *, store: bool, copies: int = 1,
                 again: bool = False) -> PreludeLoad | None:
        """Evaluate the prelude alone on this server (restoring its slot file first, if one
        was saved there), and save its slot with `store`. Once per server and prelude unless
        `again`; None if it was already done.

        `copies`: requests about to be sent at once, each of which needs the prelude in its
        own slot (llama-server gives a slot another slot's KV only through its prompt cache,
        one slot per entry). With a slot file the prelude is restored into that many idle
        slots, which the requests then pick by their common prefix; without one, all but
        one of them evaluate the prelude again."""
        key = (state.url, tokens_digest(tokens))
        with self._lock:
            lock = self._warm.setdefault(key, threading.Lock())
        with lock:
            copies = max(1, min(copies, state.info.slots or 1))
            done = self._warmed.get(key, 0)
            if done >= copies and not again:
                return None
            load, slot = None, None
            if again or not done:
                load, slot = self._evaluate(state, tokens, store)
                with self._lock:
                    self.counters.note_load(load)
                    self.counters.preludes_computed += 1 if load.computed_tokens else 0
                log.debug("%s: prelude %s on %s: %s", label, key[1][:12], state.url, load)
            if copies > 1:
                self._restore_copies(state, tokens, copies - 1, besides=slot)
            self._warmed[key] = max(copies, done)  # tried: not again for as many copies
            return load

    def _evaluate(self, state: ServerState, tokens: list[int], store: bool) -> tuple[PreludeLoad, int | None]:
        """The prelude evaluated in one slot (restored first from its slot file if there is
        one); how, and in which slot."""
        name = self._slot_file(state, tokens) if store else None
        restored = self._restore_into(state, name, 1)[0:1] if name else []
        api = _api(state)
        warm = SamplingOptions(temperature=0.0, max_tokens=1)
        generated = api.complete(CompletionAsk(tokens, 1, warm, api.warm_up_tokens, None,
                                               slot=restored[0] if restored else None))
        with self._lock:
            self.counters.server_cached_tokens += generated.cached_tokens or 0
        if store and not restored and generated.slot is not None:
            self._save_slot(state, tokens, generated.slot)
        return self._load_of(tokens, generated, bool(restored)), generated.slot

    def _load_of(self, tokens: list[int], generated: Generated, restored: bool) -> PreludeLoad:
        body = len(tokens) - 1
        reused = min(generated.cached_tokens or 0, body)
        computed = body - reused
        if restored and computed == 0:
            source = PreludeSource.SLOT
        elif reused == 0:
            source = PreludeSource.COMPUTED
        else:
            source = PreludeSource.SERVER if computed == 0 else PreludeSource.PREFIX
        return PreludeLoad(source, reused, computed)

    def _slot_file(self, state: ServerState, tokens: list[int]) -> str | None:
        """The prelude's slot file, if this llama-server saved one."""
        if self.index is None or not _api(state).saves_slots:
            return None
        name = slot_file_name(self._model_id, tokens)
        return name if state.url in self.index.slot_servers(name) else None

    def _restore_into(self, state: ServerState, name: str, count: int, besides: int | None = None) -> list[int]:
        """Load the slot file into up to `count` idle slots, the highest first (the server
        gives a request's other outputs the lowest free ones); the slots it went into."""
        idle = sorted((slot for slot in _api(state).idle_slots() if slot != besides), reverse=True)
        restored = []
        for slot in idle[:count]:
            answer = _api(state).restore_slot(slot, name)
            if answer is None or answer.tokens < 1:
                log.info("%s has no usable slot file %s any more; computing the prelude", state.url, name)
                self.index.forget_slot_file(name, state.url)
                break
            restored.append(slot)
        log.debug("%s: slot file %s restored into slots %s", state.url, name, restored)
        return restored

    def _restore_copies(self, state: ServerState, tokens: list[int], count: int, besides: int | None) -> None:
        name = self._slot_file(state, tokens)
        if name is not None:
            self._restore_into(state, name, count, besides)

    def _save_slot(self, state: ServerState, tokens: list[int], slot: int) -> None:
        if self.index is None:
            return
        name = slot_file_name(self._model_id, tokens)
        saved = _api(state).save_slot(slot, name)
        if saved is None:
            log.debug("%s saves no slots (started without --slot-save-path)", state.url)
            return
        self.index.note_slot_file(name, state.url, saved.tokens, saved.bytes)

    # ----- named preludes (the REPL) --------------------------------------------------------------

    def keep_prelude(self, label: str, tokens: list[int], kind: PreludeKind) -> None:
        if self.index is not None:
            self.index.keep(label, kind, self._model_id, tokens, slot_file_name(self._model_id, tokens))

    def kept_preludes(self, kind: PreludeKind) -> list[StoredPrelude]:
        return self.index.kept(kind, self._model_id) if self.index is not None else []

    def drop_prelude(self, label: str, kind: PreludeKind) -> int:
        return self.index.drop(label, kind) if self.index is not None else 0

    # ----- outputs -------------------------------------------------------------------------------

    def check_grammar(self, grammar: str, source: str) -> None:
        """Every server reached so far must take a schema or grammar (one reached later is
        checked before its first constrained request)."""
        for state in self.pool.servers:
            if state.api is not None:
                state.api.check_constraint(source)

    def generate(self, request: GenerationRequest, *, on_prefill: ProgressCallback | None = None,
                 on_step: StepCallback | None = None, on_text: TextCallback | None = None) -> list[list[Completion]]:
        """All outputs, or IncompleteOutputsError naming those no server could make."""
        rows = self.generate_results(request, on_prefill=on_prefill, on_step=on_step, on_text=on_text)
        lost = []
        for index, row in enumerate(rows):
            failed = [result for result in row if isinstance(result, FailedOutput)]
            if failed:
                lost.append(f"prompt {index + 1} of {len(rows)}: {failed[0].reason}")
        if lost:
            raise IncompleteOutputsError(f"{request.label}: no server could make some outputs ({'; '.join(lost)})")
        return [[result for result in row if isinstance(result, Completion)] for row in rows]

    def generate_results(self, request: GenerationRequest, *, on_prefill: ProgressCallback | None = None,
                         on_step: StepCallback | None = None,
                         on_text: TextCallback | None = None) -> list[list[OutputResult]]:
        """All parts of all jobs at once: each server decodes as many as it has slots; each
        answer's text goes to `on_text` whole, when it is complete. An output whose servers
        all failed is a FailedOutput; any other error fails the whole request."""
        for job in request.jobs:
            self.check_fits(request.prelude, job.full)
        ranking = self.pool.ranking(tokens_digest(request.prelude))
        parts = _split(request)
        loads = _Loads(copies=len(parts))
        failures: dict[int, str] = {}  # part index -> why its outputs not yet done were not made
        with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(parts))) as workers:
            futures = [workers.submit(self._run_part, request, part, ranking, loads, on_step, on_text)
                       for part in parts]
            first_error: BaseException | None = None
            for index, future in enumerate(futures):
                try:
                    future.result()
                except ServerDownError as error:
                    failures[index] = str(error)
                except BaseException as error:  # a 4xx, context overflow, ...: the whole request fails
                    first_error = first_error or error
            if first_error is not None:
                raise first_error
        self._note(request, loads)
        log.info("    %s: %d of %d prompt tokens came from the servers' caches%s", request.label, loads.cached_tokens,
                 loads.prompt_tokens, "" if loads.cache_reported else " (the servers do not report it)")
        if on_prefill is not None and loads.first is not None and loads.first.computed_tokens:
            on_prefill(loads.first.computed_tokens, loads.first.computed_tokens)
        return _assemble(request, parts, failures)

    def _run_part(self, request: GenerationRequest, part: _Part, ranking: list[ServerState],
                  loads: "_Loads", on_step: StepCallback | None, on_text: TextCallback | None) -> None:
        job = request.jobs[part.job]
        budget = self.answer_budget(job.full, request.sampling, request.label)
        sampling = request.sampling.as_greedy() if part.greedy else request.sampling
        constraint = job.constraint
        while len(part.done) < len(part.positions):
            wanted = len(part.positions) - len(part.done)

            def call(state: ServerState, granted: int) -> Generated:
                api = _api(state)
                if constraint is not None:
                    api.check_constraint(request.label)
                if request.store:
                    loads.warmed(self._warm_up(state, request.prelude, request.label, store=True,
                                               copies=loads.copies))
                seed = None if part.greedy else part.first_seed + part.offset + len(part.done)
                generated = api.complete(CompletionAsk(job.full, granted, sampling, budget, seed, constraint,
                                                       on_text=self._streamer(part, on_text)))
                loads.answered(self._load_of(request.prelude, generated, False))
                return generated
            generated = self._on_a_server(ranking, wanted, call, what=f"{request.label}: {wanted} outputs")
            first = None if part.greedy else part.first_seed + part.offset + len(part.done)
            already = len(part.done)
            reasons = generated.stop_reasons or [None] * len(generated.texts)
            for j, (text, tokens, reason) in enumerate(zip(generated.texts, generated.tokens, reasons)):
                part.done.append(Completion(text, tokens, None if first is None else first + j, reason))
            loads.count(generated)
            with self._lock:
                self.counters.generated_tokens += sum(generated.tokens)
                self.counters.server_cached_tokens += generated.cached_tokens or 0
                if on_step is not None:
                    on_step(sum(generated.tokens))
                for j, text in enumerate(generated.texts):
                    if on_text is not None and text and not generated.streamed:  # whole, when complete
                        on_text(part.job, part.positions[already + j], text)

    def _streamer(self, part: _Part, on_text: TextCallback | None) -> Callable[[int, str], None] | None:
        """For a client that streams: answer j of the request in flight is the part's output
        len(part.done) + j. (A server that fails mid-answer may have sent part of a text that
        another server then sends whole: the page shows the written file in the end.)"""
        if on_text is None:
            return None
        first = len(part.done)

        def text(index: int, piece: str) -> None:
            if 0 <= first + index < len(part.positions):  # a server's index is not trusted
                with self._lock:
                    on_text(part.job, part.positions[first + index], piece)
        return text

    def _on_a_server(self, ranking: list[ServerState], wanted: int, call: Any, *, what: str = "tokenizing") -> Any:
        """`call(server, outputs granted)` on the first server of `ranking` that is up and has
        room; on a server failure, on the next one. Raises ServerDownError when every server
        is down and has failed FAILURES_BEFORE_GIVING_UP times in a row."""
        failed_on = ""
        while True:
            got = self.pool.acquire(ranking, wanted)
            if got is None:
                if min(s.failures for s in ranking) >= FAILURES_BEFORE_GIVING_UP:
                    down = "; ".join(s.last_error or f"{s.url} is down" for s in ranking)
                    raise ServerDownError(f"every server is down: {down}")
                time.sleep(self.pool.seconds_to_retry(ranking))
                continue
            state, granted = got
            if failed_on and failed_on != state.url:
                log.warning("%s: taken over by %s from %s", what, state.url, failed_on)
            try:
                if state.info is None:
                    self._probe(state)
                result = call(state, granted)
            except ServerDownError as error:
                self.pool.mark_down(state, error)
                failed_on = state.url
                continue
            finally:
                self.pool.release(state, granted)
            self.pool.mark_up(state)
            return result

    def _note(self, request: GenerationRequest, loads: "_Loads") -> None:
        with self._lock:
            for job in request.jobs:
                self.counters.prompt_tokens += len(job.full) - len(request.prelude)
            if not loads.warm_up and loads.first is not None:  # a warm-up noted its own load
                self.counters.note_load(loads.first)


class _Loads:
    """How the prelude of one generate call was obtained: by a warm-up, or else as the first
    answer's cached tokens say."""

    def __init__(self, copies: int) -> None:
        self._lock = threading.Lock()
        self.copies = copies  # requests sent at once, which need the prelude in their slots
        self.first: PreludeLoad | None = None
        self.warm_up = False
        self.prompt_tokens = self.cached_tokens = 0
        self.cache_reported = True

    def warmed(self, load: PreludeLoad | None) -> None:
        if load is not None:
            with self._lock:
                self.first, self.warm_up = load, True

    def count(self, generated: Generated) -> None:
        with self._lock:
            self.prompt_tokens += generated.prompt_tokens
            self.cached_tokens += generated.cached_tokens or 0
            self.cache_reported &= generated.cached_tokens is not None

    def answered(self, load: PreludeLoad) -> None:
        with self._lock:
            if self.first is None:
                self.first = load


def _split(request: GenerationRequest) -> list[_Part]:
    """Per job: each greedy output alone, the sampled ones together (seed of the first + j)."""
    parts: list[_Part] = []
    for index, job in enumerate(request.jobs):
        sampled = [pos for pos, seed in enumerate(job.seeds) if seed is not None]
        for pos, seed in enumerate(job.seeds):
            if seed is None:
                parts.append(_Part(index, [pos], greedy=True))
        if sampled:
            parts.append(_Part(index, sampled, greedy=False, first_seed=job.seeds[sampled[0]]))
    return parts


def _assemble(request: GenerationRequest, parts: list[_Part], failures: dict[int, str]) -> list[list[OutputResult]]:
    """Each job's results in seed order: the part's completions, then a FailedOutput for each
    output its part did not make."""
    results: list[dict[int, OutputResult]] = [{} for _ in request.jobs]
    for index, part in enumerate(parts):
        seeds = request.jobs[part.job].seeds
        for position, completion in zip(part.positions, part.done):
            results[part.job][position] = completion
        for position in part.positions[len(part.done):]:
            results[part.job][position] = FailedOutput(seeds[position], failures.get(index, "not made"))
    return [[row[position] for position in range(len(job.seeds))] for row, job in zip(results, request.jobs)]


def _api(state: ServerState) -> ServerApi:
    """The client of a server that answered its probe (_on_a_server probes before calling)."""
    if state.api is None:
        raise ServerError(f"{state.url} was used before it was probed; report this bug")
    return state.api
