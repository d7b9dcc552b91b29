"""The seam between the commands / the REPL and whatever computes the outputs.

`Backend` is the interface; `LocalBackend` (local_backend.py: llama.cpp in this process) and
`ServerBackend` (server_backend.py: llama-server or OpenAI-compatible servers) implement it.
Commands and the REPL speak only to it.

Token protocol (the same for every backend):
  - a prelude is identified by its own tokens, `tokenize(prelude_text, at_start=True)`: that is
    the cache key of its state;
  - what the model sees for (prelude, prompt) is the joint tokenization of the concatenated
    text, `joint_tokens(prelude_text, prompt_text)`: a prelude ending mid-word gets the same
    tokens as the same text split at a word boundary;
  - the state of a prelude covers `prelude[:-1]` (its last token is decoded with the prompt,
    so a stored state needs no logits). A request reuses the longest prefix of that state
    shared with its joint tokens, `reusable_length(prelude, full)`, and evaluates the rest.
"""

from __future__ import annotations

import enum
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cached_prompts.errors import ConstraintError, ContextOverflowError, InputFileError, UnsupportedByBackendError
from cached_prompts.options import Draft, SamplingOptions

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (done, total) tokens of a prefill
StepCallback = Callable[[int], None]  # tokens generated since the last call
# (job index, seed index within the job, new text): an output's text as it is decoded; the
# pieces add up to the completion's text (a backend that cannot stream sends it whole).
TextCallback = Callable[[int, int, str], None]
SOURCES_KEPT = 1000


class BackendKind(str, enum.Enum):
    LOCAL = "local"
    LLAMA_SERVER = "llama-server"
    OPENAI = "openai"


class PreludeKind(str, enum.Enum):
    """What a stored prelude state is for; part of a cache entry's metadata."""

    PRELUDE = "prelude"  # preludes/NAME.txt
    DRAFT = "draft"  # prelude_drafts/NAME.txt (not stored)
    EXTERNAL = "external"  # sent to the REPL with a prelude_id


class PreludeSource(str, enum.Enum):
    """Where a prelude's state came from for one request."""

    MEMORY = "memory"  # the context already held it
    CACHE = "cache"  # restored from the cache (RAM or disk)
    PREFIX = "prefix"  # built on a cached prelude it starts with
    COMPUTED = "computed"  # evaluated from scratch
    SERVER = "server"  # a server's own prompt cache held (part of) it
    SLOT = "slot"  # restored from a llama-server slot file


@dataclass
class PreludeLoad:
    """How a prelude's state was obtained."""

    source: PreludeSource
    reused_tokens: int
    computed_tokens: int


@dataclass
class Counters:
    """What a backend has done so far; tests, progress and the REPL's `info` read these."""

    preludes_computed: int = 0
    prelude_tokens_computed: int = 0
    prelude_tokens_reused: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    server_cached_tokens: int = 0  # prompt tokens a server took from its own cache
    drafted_tokens: int = 0  # n-gram draft tokens verified (local engine, --draft auto)
    accepted_tokens: int = 0  # of those, the ones the sampler chose (generated_tokens counts them too)
    sources: list[str] = field(default_factory=list)  # of the last SOURCES_KEPT loads

    def note_load(self, load: PreludeLoad) -> PreludeLoad:
        self.prelude_tokens_computed += load.computed_tokens
        self.prelude_tokens_reused += load.reused_tokens
        self.sources.append(load.source.value)
        del self.sources[:-SOURCES_KEPT]  # a long-running REPL must not grow it forever
        return load

    def public(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if k != "sources"}


class StopReason(str, enum.Enum):
    """Why an answer ended; kept in each output's record (the `finished` expectation reads it)."""

    END_TOKEN = "end-token"  # the model's end-of-generation token
    STOP_STRING = "stop-string"  # one of --stop's strings
    MAX_TOKENS = "max-tokens"  # cut: --max-tokens, or the context ran out

    @property
    def finished(self) -> bool:
        """The answer ended on its own, not cut by the token budget."""
        return self is not StopReason.MAX_TOKENS


@dataclass
class Completion:
    """One generated answer."""

    text: str
    tokens: int  # generated tokens (stop strings and the end token included, as decoded)
    seed: int | None  # None: greedy
    stop_reason: StopReason | None = None  # None: the backend did not say
    drafted_tokens: int = 0  # draft tokens verified for it (local engine, --draft auto)
    accepted_tokens: int = 0  # of those, the ones kept


@dataclass(frozen=True)
class FailedOutput:
    """An output that could not be made (every server that could make it failed), and why."""

    seed: int | None
    reason: str


OutputResult = Completion | FailedOutput  # each output of `Backend.generate_results`


@dataclass(frozen=True)
class OutputConstraint:
    """What every output of a prompt must match: a GBNF grammar (root rule `root`), made from a
    JSON schema when `json_schema` is given (a server is sent the schema itself)."""

    grammar: str
    json_schema: dict[str, Any] | None = None


@dataclass
class PromptJob:
    """One prompt of a generation request: its joint tokens and one output per seed
    (None = greedy)."""

    full: list[int]  # joint tokens of prelude + prompt text
    seeds: list[int | None]
    grammar: str | None = None  # GBNF (root rule `root`) every output of this prompt must match
    # The JSON schema `grammar` was made from, if it was: a server is sent the schema itself.
    json_schema: dict[str, Any] | None = None

    @classmethod
    def constrained(cls, full: list[int], seeds: list[int | None], constraint: OutputConstraint | None) -> "PromptJob":
        if constraint is None:
            return cls(full, seeds)
        return cls(full, seeds, constraint.grammar, constraint.json_schema)

    @property
    def constraint(self) -> OutputConstraint | None:
        return None if self.grammar is None else OutputConstraint(self.grammar, self.json_schema)


@dataclass
class GenerationRequest:
    """Outputs for several prompts of one prelude. Greedy outputs are decoded alone (the
    batch changes llama.cpp's arithmetic); sampled ones may be decoded together."""

    prelude: list[int]
    jobs: list[PromptJob]
    sampling: SamplingOptions
    label: str
    kind: PreludeKind = PreludeKind.PRELUDE
    store: bool = True  # keep the prelude's state (drafts: no)
    # Sampled outputs may draft from the prelude's pool of earlier outputs (llm_cache/): their
    # bytes then depend on what earlier requests answered, so only callers whose answers are
    # not files (the REPL) ask for it; greedy outputs never use it (see docs/drafts.md).
    draft_pool: bool = False


@dataclass
class StoredPrelude:
    label: str
    tokens: int
    bytes: int


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reusable_length(prelude: Sequence[int], full: Sequence[int]) -> int:
    """How many tokens of a prelude's stored state (`prelude[:-1]`) a request with joint
    tokens `full` can start from."""
    return min(common_prefix_length(prelude[:-1], full), len(full) - 1)


class Backend(ABC):
    """Tokenization, prelude states and generation for the commands and the REPL."""

    kind: BackendKind
    counters: Counters

    # ----- what it is -----------------------------------------------------------------

    @property
    @abstractmethod
    def n_ctx(self) -> int:
        """Context length in tokens (per sequence / per server slot)."""

    @property
    @abstractmethod
    def model_name(self) -> str:
        """What a person calls the model: a file name or a server's model id."""

    @property
    @abstractmethod
    def model_id(self) -> str:
        """What identifies the model for freshness: a local file's SHA-256, or a server's
        model id. Outputs made by another model are stale."""

    @property
    def draft(self) -> Draft | None:
        """The draft mode outputs are decoded with, part of their recipe (workspace/recipe.py):
        the local engine's "auto" or "off"; None where no option of ours decides it (a server
        does its own speculation)."""
        return None

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The backend for the REPL's `info`: kind, model, servers, ..."""

    # ----- tokens -----------------------------------------------------------------------

    @abstractmethod
    def tokenize(self, text: str, *, at_start: bool) -> list[int]:
        """Tokens of `text`, special tokens parsed; `at_start` adds BOS if the model wants one."""

    def count_tokens(self, text: str, *, at_start: bool) -> int:
        return len(self.tokenize(text, at_start=at_start))

    def prelude_tokens(self, text: str, source: str) -> list[int]:
        """A prelude's own tokens; refuses an empty prelude or one that fills the context."""
        if not text:
            raise InputFileError(f"{source} is empty; write the prelude's text into it")
        tokens = self.tokenize(text, at_start=True)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"{source} has {len(tokens)} tokens, the context only {self.n_ctx}; "
                f"shorten it or {self.context_hint}")
        return tokens

    def joint_tokens(self, prelude_text: str, prompt_text: str) -> list[int]:
        """What the model sees for a prelude and a prompt: their concatenation, tokenized."""
        return self.tokenize(prelude_text + prompt_text, at_start=True)

    def check_fits(self, prelude: Sequence[int], full: Sequence[int]) -> None:
        if len(full) >= self.n_ctx:
            raise ContextOverflowError(
                f"prelude + prompt take {len(prelude)} + {len(full) - len(prelude)} = {len(full)} "
                f"tokens, the context only {self.n_ctx}; shorten them or {self.context_hint}")

    def answer_budget(self, full: Sequence[int], sampling: SamplingOptions, label: str) -> int:
        """Most tokens each answer to `full` may take: --max-tokens, or what the context has
        left (said in a warning)."""
        budget = min(sampling.max_tokens, self.n_ctx - len(full))
        if budget < sampling.max_tokens:
            log.warning("%s: only %d tokens of context left for each answer (--max-tokens %d)",
                        label, budget, sampling.max_tokens)
        return budget

    @property
    def context_hint(self) -> str:
        """How the user gets a longer context from this backend."""
        return "raise --lp-n-ctx"

    # ----- prelude states and outputs -----------------------------------------------------

    @abstractmethod
    def prepare_prelude(self, tokens: list[int], label: str, *, kind: PreludeKind = PreludeKind.PRELUDE,
                        store: bool = True, on_prefill: ProgressCallback | None = None) -> PreludeLoad:
        """Make the prelude's state ready (and stored, with `store`) for later requests."""

    @abstractmethod
    def generate(self, request: GenerationRequest, *, on_prefill: ProgressCallback | None = None,
                 on_step: StepCallback | None = None, on_text: TextCallback | None = None) -> list[list[Completion]]:
        """For each job, one completion per seed, in order; `on_text` hears their text as it
        is made (see TextCallback). All or nothing: an output that cannot be made is an error."""

    def generate_results(self, request: GenerationRequest, *, on_prefill: ProgressCallback | None = None,
                         on_step: StepCallback | None = None,
                         on_text: TextCallback | None = None) -> list[list[OutputResult]]:
        """As `generate`, but an output that could not be made while others could (servers
        that failed) is a FailedOutput in its place; what fails the whole request (a context
        overflow, a refused request) is still raised. The local engine makes all or nothing."""
        return [list(row) for row in self.generate(request, on_prefill=on_prefill, on_step=on_step,
                                                   on_text=on_text)]

    # ----- log-probabilities of given tokens (score-preludes) ----------------------------

    def token_pieces(self, tokens: list[int]) -> list[bytes]:
        """The bytes each of a prelude's tokens (`prelude_tokens`) spells; a piece may be part
        of a UTF-8 character, and a BOS the tokenizer put in front spells nothing."""
        raise self._no_logprobs()

    def token_logprobs(self, tokens: list[int], first: int, end: int, label: str, *,
                       store: bool = True) -> list[float]:
        """log P(tokens[i] | tokens[:i]) for first <= i < end (1 <= first < end <= len(tokens)),
        where `tokens` is a prelude stored under `label`: its state may come from (and go to)
        the cache. `store` False: nothing is stored, and the state before `first` is prepared
        as a draft's and kept for the next request or call (pick's candidates share it).
        A backend that cannot tell raises UnsupportedByBackendError."""
        raise self._no_logprobs()

    def _no_logprobs(self) -> UnsupportedByBackendError:
        return UnsupportedByBackendError(
            f"the {self.kind.value} backend does not give the log-probability of every prompt token, "
            "which scoring needs; run it with the local engine (without --server)")

    # ----- named preludes (the REPL's prelude_id) ---------------------------------------

    @abstractmethod
    def keep_prelude(self, label: str, tokens: list[int], kind: PreludeKind) -> None:
        """Make sure `label` has its own stored state for `tokens` (replacing the label's
        older one), after the prelude was prepared or used by a request."""

    @abstractmethod
    def kept_preludes(self, kind: PreludeKind) -> list[StoredPrelude]:
        """The stored preludes of `kind` for this model, sorted by label."""

    @abstractmethod
    def drop_prelude(self, label: str, kind: PreludeKind) -> int:
        """Remove the label's stored states (for any model); how many were removed."""

    def check_grammar(self, grammar: str, source: str) -> None:
        """Raise ConstraintError if `grammar` (GBNF) cannot constrain this backend's outputs.
        A backend that applies `PromptJob.grammar` (or its json_schema) overrides this; the
        others refuse, so a constraint is never silently ignored."""
        raise ConstraintError(f"{source}: the {self.kind.value} backend cannot constrain outputs with a "
                              "grammar or JSON schema; use the local engine (no --server)")

    def close(self) -> None:
        """Free what the backend holds (model, context, connections)."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
